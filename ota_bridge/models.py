"""The tables, and opening the database behind a URL (SQLite by default, PostgreSQL at scale).

Times are stored as naive UTC datetimes. Child jobs carry their own copy of the command, so a
workflow can be deleted without touching the records of jobs that used it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union
from urllib.parse import unquote, urlsplit

import peewee as pw

from agent.protocol import JobStatus

from .errors import ConfigError
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


class CredentialChange(BaseModel):
    """A device whose broker login stopped being what it was (disabled, re-keyed or deleted), one row
    per change: the embedded broker's login re-check reads the rows after the last it saw instead of
    every device's credentials (store/devices.py, note_credential_changes)."""

    id = pw.BigAutoField()
    device_id = pw.CharField(max_length=128)
    at = pw.DateTimeField(default=now, index=True)


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
    parameters = pw.TextField(null=True)  # the job's Parameters as JSON; command holds them filled in
    # Retries (store/attempts.py): up to retry_max more attempts, retry_delay_seconds apart, of a child
    # whose attempt ended in one of retry_on (comma-separated states).
    retry_max = pw.IntegerField(default=0)
    retry_delay_seconds = pw.IntegerField(default=0)
    retry_on = pw.CharField(max_length=64, default="")
    # OnFailure: the rollback workflow's command, snapshotted like command, run by the rollback children.
    on_failure_workflow_id = pw.CharField(max_length=36, null=True)
    on_failure_command = pw.TextField(null=True)
    on_failure_timeout_seconds = pw.IntegerField(null=True)
    on_failure_success_on_restart = pw.BooleanField(default=False)


class SeqField(pw.AutoField):
    """An id never handed out twice, even after the newest rows are deleted.

    Agents refuse a job older than one they already ran, so a reused number would be refused.
    PostgreSQL's sequences never reuse; SQLite needs AUTOINCREMENT for that.
    """

    def ddl(self, ctx: pw.Context) -> pw.NodeList:
        node = super().ddl(ctx)
        return pw.NodeList((node, pw.SQL("AUTOINCREMENT"))) if isinstance(db.obj, pw.SqliteDatabase) else node


class Outcome(BaseModel):
    """How an attempt went: the columns a child job and each of its earlier attempts share (no table)."""

    start_time = pw.DateTimeField(null=True)
    end_time = pw.DateTimeField(null=True)
    exit_code = pw.IntegerField(null=True)
    stdout = pw.TextField(default="")
    stderr = pw.TextField(default="")
    stdout_truncated = pw.BooleanField(default=False)
    stderr_truncated = pw.BooleanField(default=False)
    reason = pw.TextField(null=True)  # why it ended, or while SCHEDULED why it is held


class ChildJob(Outcome):
    """One job on one device. seq orders every device's queue: lower runs first."""

    seq = SeqField()
    job_id = pw.CharField(max_length=36, unique=True)
    # Its index, and the ended jobs', depend on the database: BY_DATABASE_INDEXES.
    parent = pw.ForeignKeyField(Job, backref="children", on_delete="CASCADE", column_name="parent_id", index=False)
    device_id = pw.CharField(max_length=128)  # no foreign key: history outlives the device
    status = pw.CharField(max_length=16, default=JobStatus.QUEUED.value)
    # SCHEDULED only: when the service releases it by itself (a retry's delay); None: only a
    # rollout's decision releases it. Read on the service's clock (ota_bridge/clock.py).
    release_at = pw.DateTimeField(null=True)
    download_bytes = pw.BigIntegerField(null=True)  # DOWNLOADING: the artifacts' bytes the device has so far
    download_total = pw.BigIntegerField(null=True)  # ... of all of them (both in ADDED_COLUMNS)
    # True when the service, not the device, made the job final (a timeout, a cancel): the
    # device's own final report, if it comes, is then stored once beside it.
    finalized_by_service = pw.BooleanField(default=False)
    updated = pw.DateTimeField(default=now)  # the service's clock: when the row last changed
    attempt = pw.IntegerField(default=1)  # the current attempt; earlier ones are AttemptResult rows
    # A rollback child: the job_id of the child whose final failure releases it (OnFailure); else None.
    on_failure_of = pw.CharField(max_length=36, null=True)  # found through the device's queue index

    class Meta:
        indexes = (
            (("device_id", "status", "seq"), False),  # a device's pending queue, in order
            (("parent", "status"), False),  # a parent's children and their counts per state
            (("status", "updated"), False),  # jobs IN_PROGRESS for too long; the console's changes
        )


class AttemptResult(Outcome):
    """An earlier attempt of a retried child job, as it ended; the child's own fields hold the latest."""

    id = pw.BigAutoField()
    child = pw.ForeignKeyField(ChildJob, backref="attempt_rows", on_delete="CASCADE", column_name="child_seq")
    number = pw.IntegerField()
    status = pw.CharField(max_length=16)

    class Meta:
        indexes = ((("child", "number"), True),)


class Artifact(BaseModel):
    """An uploaded file: its bytes live once per SHA-256 in the artifact directory (artifact_files.py)."""

    artifact_id = pw.CharField(max_length=36, primary_key=True)
    name = pw.CharField(max_length=200)  # the file's name on the device (ARTIFACT_NAME_PATTERN)
    version = pw.CharField(max_length=100)
    sha256 = pw.CharField(max_length=64, index=True)
    size = pw.BigIntegerField()
    created = pw.DateTimeField(default=now, index=True)


class WorkflowArtifact(BaseModel):
    """The artifacts a workflow names, in order. No foreign key to the artifact: a job is refused
    (400) if one was deleted since."""

    workflow = pw.ForeignKeyField(Workflow, backref="artifact_rows", on_delete="CASCADE", column_name="workflow_id")
    position = pw.IntegerField()
    artifact_id = pw.CharField(max_length=36, index=True)

    class Meta:
        primary_key = pw.CompositeKey("workflow", "position")


class JobArtifact(BaseModel):
    """A job's copy of its workflow's artifacts, taken at submission like its command: later edits of
    the workflow or the artifact records change no job."""

    job = pw.ForeignKeyField(Job, backref="artifact_rows", on_delete="CASCADE", column_name="job_id")
    position = pw.IntegerField()
    artifact_id = pw.CharField(max_length=36, index=True)
    name = pw.CharField(max_length=200)
    sha256 = pw.CharField(max_length=64)
    size = pw.BigIntegerField()

    class Meta:
        primary_key = pw.CompositeKey("job", "position")


class Rollout(BaseModel):
    """A job's rollout: its plan (rollout_plan.Plan as JSON) and how far it got. Decisions read and
    write it in one transaction with the children they release (store/rollouts.py)."""

    job = pw.ForeignKeyField(Job, primary_key=True, on_delete="CASCADE", column_name="job_id")
    plan = pw.TextField()
    continuous = pw.BooleanField(default=False)
    active = pw.BooleanField(default=True, index=True)  # False: done, aborted or canceled: nothing to decide
    paused = pw.BooleanField(default=False)
    aborted = pw.BooleanField(default=False)
    abort_reason = pw.TextField(null=True)
    wave = pw.IntegerField(default=0)  # waves opened so far
    wave_ready_at = pw.DateTimeField(null=True)  # when the last wave reached WaveSuccessPercent (soak from here)
    wave_base = pw.IntegerField(default=0)  # children released before the last wave opened
    wave_from_seq = pw.BigIntegerField(null=True)  # the first Seq the last wave released: its children are at or above
    released = pw.IntegerField(default=0)  # children the rollout released
    rate = pw.FloatField(null=True)  # MaxPerMinute now (it grows with Growth)
    rate_successes = pw.IntegerField(default=0)
    window_start = pw.DateTimeField(null=True)  # the rate limit's current minute, on the service's clock
    window_released = pw.IntegerField(default=0)
    checked_at = pw.DateTimeField(null=True)  # the service's clock at the last decision


class Webhook(BaseModel):
    """A URL that receives a signed POST when a job or child job ends (ota_bridge/webhooks.py)."""

    webhook_id = pw.CharField(max_length=36, primary_key=True)
    url = pw.CharField(max_length=2000)
    secret = pw.CharField(max_length=100)  # the HMAC key; kept as is, since signing needs it
    created = pw.DateTimeField(default=now)


class WebhookDelivery(BaseModel):
    """The outbox: one POST still to make (or given up on), so that it survives a restart."""

    id = pw.BigAutoField()
    webhook = pw.ForeignKeyField(Webhook, backref="deliveries", on_delete="CASCADE", column_name="webhook_id")
    body = pw.TextField()  # the JSON sent, exactly as signed
    attempts = pw.IntegerField(default=0)
    next_attempt = pw.DateTimeField(default=now)  # also a lease: a sender takes a delivery by moving this on
    failed = pw.BooleanField(default=False)  # given up after the last attempt; kept to be seen
    last_error = pw.CharField(max_length=300, null=True)
    created = pw.DateTimeField(default=now)

    class Meta:
        indexes = ((("failed", "next_attempt"), False),)


class WebhookCursor(BaseModel):
    """How far the webhook senders have read the jobs that ended: (end time, seq) of the last one."""

    name = pw.CharField(max_length=32, primary_key=True)
    end_time = pw.DateTimeField()
    seq = pw.BigIntegerField()


TABLES = (ApiToken, Workflow, Device, DeviceTag, Job, ChildJob, AuditEntry, Webhook, WebhookDelivery, WebhookCursor,
          AttemptResult, Rollout, Artifact, WorkflowArtifact, JobArtifact, CredentialChange)
# Columns added after a table was first released: (table, column, DDL), added at open when missing.
ADDED_COLUMNS = (
    ("api_token", "role", f"VARCHAR(16) NOT NULL DEFAULT '{Role.ADMIN.value}'"),  # every older token was admin
    ("child_job", "release_at", "TIMESTAMP"),
    ("job", "parameters", "TEXT"),
    ("job", "retry_max", "INTEGER NOT NULL DEFAULT 0"),
    ("job", "retry_delay_seconds", "INTEGER NOT NULL DEFAULT 0"),
    ("job", "retry_on", "VARCHAR(64) NOT NULL DEFAULT ''"),
    ("job", "on_failure_workflow_id", "VARCHAR(36)"),
    ("job", "on_failure_command", "TEXT"),
    ("job", "on_failure_timeout_seconds", "INTEGER"),
    ("job", "on_failure_success_on_restart", "BOOLEAN NOT NULL DEFAULT FALSE"),
    ("child_job", "attempt", "INTEGER NOT NULL DEFAULT 1"),
    ("child_job", "on_failure_of", "VARCHAR(36)"),
    ("child_job", "download_bytes", "BIGINT"),
    ("child_job", "download_total", "BIGINT"),
)
# Indexes over columns of ADDED_COLUMNS, made after them at open when missing: (table, index, DDL).
ADDED_INDEXES = (
    # the children held until a time (a retry's delay), for the release loop's scan each second
    ("child_job", "child_job_status_release_at", '("status", "release_at") WHERE "release_at" IS NOT NULL'),
)
# Indexes one kind of database has and the other not, made at open when missing (after ADDED_INDEXES),
# and those it drops at open: {kind: (made, dropped)}, made as in ADDED_INDEXES, dropped (table, index).
# When an UPDATE changes an indexed column (a release: status), PostgreSQL writes the row's new
# version into every index whose predicate it meets, SQLite only into the indexes of the columns that
# changed. So on PostgreSQL the child jobs have no index on parent_id alone ((parent_id, status)
# serves every lookup by parent, and the cascade) and the jobs that ended since the webhooks' cursor
# have a partial index (store/webhooks.py's reads say end_time IS NOT NULL), which a child not yet
# ended is not in; SQLite keeps both full indexes, which no release writes.
BY_DATABASE_INDEXES: dict[str, tuple[tuple[tuple[str, str, str], ...], tuple[tuple[str, str], ...]]] = {
    "sqlite": ((("child_job", "child_job_parent_id", '("parent_id")'),
                ("child_job", "child_job_end_time_seq", '("end_time", "seq")')), ()),
    "postgres": ((("child_job", "child_job_ended", '("end_time", "seq") WHERE "end_time" IS NOT NULL'),),
                 (("child_job", "child_job_parent_id"), ("child_job", "child_job_end_time_seq"))),
}
PRIVATE_MODE = 0o600  # the database files: job output, commands, credential hashes
PRIVATE_DIR_MODE = 0o700


def open_database(url: str) -> GuardedDatabase:
    """Open (and create or bring up to date the tables of) the database at url; binds the models to it.

    Raises ConfigError, in one line, when it cannot be opened: no driver, server unreachable, no such
    database, refused login.
    """
    database = _connect(url)
    db.initialize(database)
    try:
        database.connect(reuse_if_open=True)
        database.create_tables(TABLES, safe=True)
        _add_missing_columns(database)
        made, dropped = BY_DATABASE_INDEXES["sqlite" if isinstance(database, pw.SqliteDatabase) else "postgres"]
        _add_missing_indexes(database, ADDED_INDEXES + made)
        _drop_old_indexes(database, dropped)
    except pw.ImproperlyConfigured as e:
        raise ConfigError(f"cannot open the {describe(url)}: {NO_POSTGRES_DRIVER}") from e
    except (pw.DatabaseError, pw.InterfaceError) as e:
        raise ConfigError(f"cannot open the {describe(url)}: {explain(database, e)}") from e
    return database


NO_POSTGRES_DRIVER = ("PostgreSQL support is not installed: pip install 'ota-bridge[postgres]' "
                      "(in a checkout: .venv/bin/pip install '.[postgres]'), or pip install psycopg2-binary asyncpg")


def _add_missing_columns(database: pw.Database) -> None:
    for table, column, ddl in ADDED_COLUMNS:
        if _has_column(database, table, column):
            continue
        try:
            database.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {ddl}')
        except pw.DatabaseError:  # another process may have added it meanwhile
            if not _has_column(database, table, column):
                raise


def _add_missing_indexes(database: pw.Database, indexes: tuple[tuple[str, str, str], ...]) -> None:
    for table, name, ddl in indexes:
        try:
            database.execute_sql(f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table}" {ddl}')
        except pw.DatabaseError:  # another process may have made it meanwhile
            if name not in {i.name for i in database.get_indexes(table)}:
                raise


def _drop_old_indexes(database: pw.Database, indexes: tuple[tuple[str, str], ...]) -> None:
    for table, name in indexes:
        if name in {i.name for i in database.get_indexes(table)}:
            database.execute_sql(f'DROP INDEX IF EXISTS "{name}"')  # IF EXISTS: another process may drop it too


def _has_column(database: pw.Database, table: str, column: str) -> bool:
    return column in {c.name for c in database.get_columns(table)}


FULL_BELOW_BYTES = 1 << 20  # less room than this, on the disk or under the file size limit, is "full"
APPLICATION_NAME = "ota-bridge"  # how the service's connections show in pg_stat_activity
# libpq: give up a connect after 5 s; notice a silent peer (a cut network, a dead host) within about
# 25 s when idle (keepalives) and 30 s when data we sent goes unacknowledged (tcp_user_timeout).
POSTGRES_CONNECTION = {"application_name": APPLICATION_NAME, "connect_timeout": 5, "keepalives_idle": 10,
                       "keepalives_interval": 5, "keepalives_count": 3, "tcp_user_timeout": 30000}


class _Guarded:
    """What the store needs to recover from a lost connection (mixed into peewee's databases).

    `wrote` says whether a write may have reached the database since the store last cleared it:
    a COMMIT was sent, or a write outside a transaction (which commits by itself). A call that
    fails before that changed nothing, so the store may run it again. `began`: a transaction was
    opened.

    A rollback that fails while an error is being handled (a dead connection, or SQLite's "cannot
    rollback - no transaction is active" after a disk-full commit) no longer replaces that error:
    it is kept in `rollback_error` and the store discards the connection.
    """

    wrote = False
    began = False  # a transaction was opened since the store last cleared it
    rollback_error: Exception | None = None

    def begin(self, *args: Any, **kwargs: Any) -> Any:
        result = super().begin(*args, **kwargs)  # type: ignore[misc]
        self.began = True
        return result

    def commit(self) -> Any:
        self.wrote = True
        return super().commit()  # type: ignore[misc]

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        if not self.in_transaction() and sql.lstrip()[:6].upper() != "SELECT":  # type: ignore[attr-defined]
            self.wrote = True
        return super().execute_sql(sql, params)  # type: ignore[misc]

    def rollback(self) -> Any:
        cause = sys.exc_info()[1]
        try:
            return super().rollback()  # type: ignore[misc]
        except (pw.DatabaseError, pw.InterfaceError) as e:
            if cause is None:
                raise
            self.rollback_error = e
            return None


class GuardedSqlite(_Guarded, pw.SqliteDatabase):
    pass


class GuardedPostgres(_Guarded, pw.PostgresqlDatabase):
    pass


GuardedDatabase = Union[GuardedSqlite, GuardedPostgres]


def connection_lost(database: pw.Database) -> bool:
    """True when the server or the network closed the PostgreSQL connection (psycopg2 marks it closed)."""
    conn = database._state.conn  # peewee's own accessor would open a connection
    return conn is not None and bool(getattr(conn, "closed", 0))


def connection_broken(database: pw.Database) -> bool:
    """True when the connection cannot be trusted any more: lost, or a rollback on it failed."""
    return getattr(database, "rollback_error", None) is not None or connection_lost(database)


def connection_stale(database: pw.Database) -> bool:
    """True when an idle PostgreSQL connection has something to read: the server's goodbye, or the end.

    An idle connection receives nothing unless the server is closing it (pg_terminate_backend, a
    restart, an idle timeout, a proxy), so this finds a dead connection without a round trip.
    """
    conn = database._state.conn
    if conn is None or not isinstance(database, pw.PostgresqlDatabase) or database.in_transaction():
        return False
    try:
        return bool(conn.closed) or bool(select.select([conn.fileno()], [], [], 0)[0])
    except Exception:  # OSError, or the driver's error for a connection already closed
        return True


def discard_connection(database: GuardedDatabase) -> None:
    """Forget the connection, whatever state it is in; the next query opens a new one."""
    database.rollback_error = None
    close_connection(database)


def close_connection(database: pw.Database) -> None:
    """Close this thread's connection, whatever state it is in (peewee refuses to close one in a
    transaction: then it is disposed of)."""
    try:
        database.close()
    except Exception:
        database.dispose()


def explain(database: GuardedDatabase, error: BaseException) -> str:
    """The driver's message on one line, with what SQLite's own message leaves out: the error's
    name, and whether the disk or the process's file size limit is full."""
    reason = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(database, pw.SqliteDatabase):
        return reason
    name = getattr(getattr(error, "orig", error), "sqlite_errorname", None)  # e.g. SQLITE_IOERR_WRITE, SQLITE_FULL
    hints = ([name] if name else []) + _space_hints(Path(database.database))
    return f"{reason} ({'; '.join(hints)})" if hints else reason


def _space_hints(path: Path) -> list[str]:
    """What is full where the SQLite file lives: the filesystem, or the file size limit (ulimit -f)."""
    hints = []
    with contextlib.suppress(OSError):
        stat = os.statvfs(path.parent)
        free = stat.f_bavail * stat.f_frsize
        if free < FULL_BELOW_BYTES:
            hints.append(f"the filesystem holding it has {free} bytes free")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        files = [path, path.with_name(path.name + "-wal")]
        largest = max((f.stat().st_size for f in files if f.exists()), default=0)
        if largest + FULL_BELOW_BYTES > limit:
            hints.append(f"the process's file size limit (RLIMIT_FSIZE, ulimit -f) is {limit} bytes "
                         f"and its files reach {largest}")
    return hints


def describe(url: str) -> str:
    """Where the database is, for logs: the SQLite file, or PostgreSQL's host, port and name (no password)."""
    if url.startswith("sqlite:///"):
        return f"SQLite file {Path(url[len('sqlite:///'):]).resolve()}"
    parts = urlsplit(url)
    return f"PostgreSQL database {parts.path.lstrip('/')!r} at {parts.hostname}:{parts.port or 5432}"


def _connect(url: str) -> GuardedDatabase:
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        _make_private(path)
        return GuardedSqlite(str(path), pragmas={
            "journal_mode": "wal",
            "busy_timeout": 10000,
            "foreign_keys": 1,
            "synchronous": "normal",
        })
    parts = urlsplit(url)
    return GuardedPostgres(
        parts.path.lstrip("/"),
        host=parts.hostname,
        port=parts.port or 5432,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        **POSTGRES_CONNECTION,
    )


def _make_private(path: Path) -> None:
    """Create the SQLite file 0600, or tighten it; SQLite gives its -wal and -shm files the same mode."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and file.stat().st_mode & 0o777 != PRIVATE_MODE:
            os.chmod(file, PRIVATE_MODE)
