"""The tables, and opening the database behind a URL (SQLite by default, PostgreSQL at scale).

Times are stored as naive UTC datetimes. Child jobs carry their own copy of the command, so a
workflow can be deleted without touching the records of jobs that used it.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlsplit

import peewee as pw

from agent.protocol import JobStatus

from .roles import Role

db = pw.DatabaseProxy()


def now() -> datetime:
    """The current time as stored: naive UTC."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def naive_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


class BaseModel(pw.Model):
    class Meta:
        database = db
        legacy_table_names = False


class ApiToken(BaseModel):
    name = pw.CharField(max_length=100)
    token_hash = pw.CharField(max_length=64, unique=True)
    role = pw.CharField(max_length=16)  # a Role; added by ADDED_COLUMNS to databases made before roles
    created = pw.DateTimeField(default=now)


class AuditEntry(BaseModel):
    """One state-changing API request, accepted or refused: who, what, when, result. Never a secret."""

    id = pw.BigAutoField()
    time = pw.DateTimeField(default=now)
    token_name = pw.CharField(max_length=100, null=True)  # None: no valid token came
    role = pw.CharField(max_length=16, null=True)
    remote = pw.CharField(max_length=64, null=True)
    method = pw.CharField(max_length=16)
    path = pw.CharField(max_length=300)
    target_id = pw.CharField(max_length=128, null=True)
    status = pw.IntegerField()
    outcome = pw.CharField(max_length=100)


class Workflow(BaseModel):
    workflow_id = pw.CharField(max_length=36, primary_key=True)
    name = pw.CharField(max_length=200)
    command = pw.TextField()
    timeout_seconds = pw.IntegerField(null=True)
    success_on_restart = pw.BooleanField(default=False)
    created = pw.DateTimeField(default=now)


class Device(BaseModel):
    device_id = pw.CharField(max_length=128, primary_key=True)
    group = pw.CharField(max_length=200, null=True, index=True, column_name="device_group")
    password_hash = pw.CharField(max_length=200)
    enabled = pw.BooleanField(default=True)
    online = pw.BooleanField(default=False)
    last_seen = pw.DateTimeField(null=True)
    created = pw.DateTimeField(default=now)


class DeviceTag(BaseModel):
    device = pw.ForeignKeyField(Device, backref="tag_rows", on_delete="CASCADE", column_name="device_id")
    tag = pw.CharField(max_length=200, index=True)

    class Meta:
        primary_key = pw.CompositeKey("device", "tag")


class Job(BaseModel):
    """What an operator submitted: one workflow on one target. Its children do the work."""

    job_id = pw.CharField(max_length=36, primary_key=True)
    name = pw.CharField(max_length=200)
    workflow_id = pw.CharField(max_length=36, index=True)  # no foreign key: workflows may go
    command = pw.TextField()
    timeout_seconds = pw.IntegerField()
    success_on_restart = pw.BooleanField(default=False)
    target_field = pw.CharField(max_length=16)  # "DeviceId", "DeviceGroup" or "TagId"
    target_value = pw.CharField(max_length=200)
    created = pw.DateTimeField(default=now, index=True)


class SeqField(pw.AutoField):
    """An id never handed out twice, even after the newest rows are deleted.

    Agents refuse a job older than one they already ran, so a reused number would be refused.
    PostgreSQL's sequences never reuse; SQLite needs AUTOINCREMENT for that.
    """

    def ddl(self, ctx: pw.Context) -> pw.NodeList:
        node = super().ddl(ctx)
        return pw.NodeList((node, pw.SQL("AUTOINCREMENT"))) if isinstance(db.obj, pw.SqliteDatabase) else node


class ChildJob(BaseModel):
    """One job on one device. seq orders every device's queue: lower runs first."""

    seq = SeqField()
    job_id = pw.CharField(max_length=36, unique=True)
    parent = pw.ForeignKeyField(Job, backref="children", on_delete="CASCADE", column_name="parent_id")
    device_id = pw.CharField(max_length=128)  # no foreign key: history outlives the device
    status = pw.CharField(max_length=16, default=JobStatus.QUEUED.value)
    start_time = pw.DateTimeField(null=True)
    end_time = pw.DateTimeField(null=True)
    exit_code = pw.IntegerField(null=True)
    stdout = pw.TextField(default="")
    stderr = pw.TextField(default="")
    stdout_truncated = pw.BooleanField(default=False)
    stderr_truncated = pw.BooleanField(default=False)
    reason = pw.TextField(null=True)
    # True when the service, not the device, made the job final (a timeout, a cancel): the
    # device's own final report, if it comes, is then stored once beside it.
    finalized_by_service = pw.BooleanField(default=False)
    updated = pw.DateTimeField(default=now)  # the service's clock: when the row last changed

    class Meta:
        indexes = (
            (("device_id", "status", "seq"), False),  # a device's pending queue, in order
            (("parent", "status"), False),  # a parent's counts per state
            (("status", "updated"), False),  # jobs IN_PROGRESS for too long
        )


TABLES = (ApiToken, Workflow, Device, DeviceTag, Job, ChildJob, AuditEntry)
# Columns added after a table was first released: (table, column, DDL), added at open when missing.
ADDED_COLUMNS = (
    ("api_token", "role", f"VARCHAR(16) NOT NULL DEFAULT '{Role.ADMIN.value}'"),  # every older token was admin
)
PRIVATE_MODE = 0o600  # the database files: job output, commands, credential hashes
PRIVATE_DIR_MODE = 0o700


def open_database(url: str) -> pw.Database:
    """Open (and create or bring up to date the tables of) the database at url; binds the models to it."""
    database = _connect(url)
    db.initialize(database)
    database.connect(reuse_if_open=True)
    database.create_tables(TABLES, safe=True)
    _add_missing_columns(database)
    return database


def _add_missing_columns(database: pw.Database) -> None:
    for table, column, ddl in ADDED_COLUMNS:
        if _has_column(database, table, column):
            continue
        try:
            database.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {ddl}')
        except pw.DatabaseError:  # another process may have added it meanwhile
            if not _has_column(database, table, column):
                raise


def _has_column(database: pw.Database, table: str, column: str) -> bool:
    return column in {c.name for c in database.get_columns(table)}


def _connect(url: str) -> pw.Database:
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        _make_private(path)
        return pw.SqliteDatabase(str(path), pragmas={
            "journal_mode": "wal",
            "busy_timeout": 10000,
            "foreign_keys": 1,
            "synchronous": "normal",
        })
    parts = urlsplit(url)
    return pw.PostgresqlDatabase(
        parts.path.lstrip("/"),
        host=parts.hostname,
        port=parts.port or 5432,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def _make_private(path: Path) -> None:
    """Create the SQLite file 0600, or tighten it; SQLite gives its -wal and -shm files the same mode."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and file.stat().st_mode & 0o777 != PRIVATE_MODE:
            os.chmod(file, PRIVATE_MODE)
