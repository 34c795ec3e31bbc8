"""What changed since a moment, for the web console's event stream: read-only queries it polls.

Child jobs are found by the (status, updated) index, one range per state; new jobs by the index on
Job.created. Presence has no timestamp of its own (going offline keeps LastSeen), so it is read
whole: the device id, Online and LastSeen of every device.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from agent.protocol import JobStatus

from ..models import ChildJob, Device, Job

MAX_ROWS = 1000  # per state and poll; a bigger burst is not sent row by row (the stream says "resync")


@dataclass(frozen=True)
class ChildChange:
    job_id: str
    parent_id: str
    device_id: str
    status: str
    updated: datetime


def child_changes(since: datetime) -> tuple[list[ChildChange], bool]:
    """Child jobs whose row changed after since, oldest change first, and whether a state had more
    than MAX_ROWS (the answer then leaves some out)."""
    found: list[ChildChange] = []
    truncated = False
    for status in JobStatus:
        rows = (ChildJob.select(ChildJob.job_id, ChildJob.parent, ChildJob.device_id, ChildJob.status,
                                ChildJob.updated)
                .where(ChildJob.status == status.value, ChildJob.updated > since)
                .order_by(ChildJob.updated).limit(MAX_ROWS).tuples())
        before = len(found)
        found.extend(ChildChange(*row) for row in rows)
        truncated = truncated or len(found) - before == MAX_ROWS
    return sorted(found, key=lambda c: c.updated), truncated


def new_jobs(since: datetime) -> list[tuple[str, datetime]]:
    """(job id, created) of the jobs submitted after since."""
    rows = Job.select(Job.job_id, Job.created).where(Job.created > since).order_by(Job.created).limit(MAX_ROWS)
    return list(rows.tuples())


def presence() -> dict[str, tuple[bool, datetime | None]]:
    """Every device's (Online, LastSeen)."""
    return {device_id: (online, seen) for device_id, online, seen
            in Device.select(Device.device_id, Device.online, Device.last_seen).tuples()}
