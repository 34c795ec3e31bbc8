"""The audit log: one row per state-changing API request, accepted or refused."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..models import AuditEntry


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


def record(entry: AuditRecord) -> None:
    AuditEntry.create(token_name=entry.token_name, role=entry.role, remote=entry.remote, method=entry.method,
                      path=entry.path, target_id=entry.target_id, status=entry.status, outcome=entry.outcome)


def list_entries(limit: int, offset: int) -> tuple[list[AuditView], int]:
    """A page of the log, newest first, and how many rows there are in all."""
    rows = AuditEntry.select().order_by(AuditEntry.id.desc()).limit(limit).offset(offset)
    return [_view(row) for row in rows], AuditEntry.select().count()


def _view(row: AuditEntry) -> AuditView:
    return AuditView(row.time, AuditRecord(row.token_name, row.role, row.remote, row.method, row.path,
                                           row.target_id, row.status, row.outcome))
