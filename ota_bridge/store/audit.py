"""The audit log: one row per state-changing API request, accepted or refused."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..models import AuditEntry, now
from . import arg, prepared, writes_no_jobs


@dataclass(frozen=True)
class AuditRecord:
    """What the API tells the log about one request. It holds no secret: no body, no token."""

    token_name: str | None
    role: str | None
    remote: str | None
    method: str
    path: str
    target_id: str | None
    status: int
    outcome: str


@dataclass(frozen=True)
class AuditView:
    time: datetime
    record: AuditRecord


_COLUMNS = (AuditEntry.time, AuditEntry.token_name, AuditEntry.role, AuditEntry.remote, AuditEntry.method,
            AuditEntry.path, AuditEntry.target_id, AuditEntry.status, AuditEntry.outcome)


@writes_no_jobs
def record(entry: AuditRecord) -> None:
    """One row, as a prepared INSERT: every POST writes one, and peewee building the INSERT (and a
    model to hold it) cost more than SQLite running it."""
    prepared("audit_record", _insert, now(), entry.token_name, entry.role, entry.remote, entry.method, entry.path,
             entry.target_id, entry.status, entry.outcome)


def _insert(count: int) -> Any:
    return AuditEntry.insert({column: arg(i) for i, column in enumerate(_COLUMNS)})


def list_entries(limit: int, offset: int) -> tuple[list[AuditView], int]:
    """A page of the log, newest first, and how many rows there are in all."""
    rows = AuditEntry.select().order_by(AuditEntry.id.desc()).limit(limit).offset(offset)
    return [_view(row) for row in rows], AuditEntry.select().count()


def _view(row: AuditEntry) -> AuditView:
    return AuditView(row.time, AuditRecord(row.token_name, row.role, row.remote, row.method, row.path,
                                           row.target_id, row.status, row.outcome))
