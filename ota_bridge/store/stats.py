"""Read-only figures for /metrics: jobs by state, queue depths, devices online. Nothing here writes."""

from __future__ import annotations

from dataclasses import dataclass, field

import peewee as pw

from agent.protocol import JobStatus

from ..models import ChildJob, Device, db
from . import PENDING


@dataclass(frozen=True)
class FleetStats:
    jobs: dict[str, int] = field(default_factory=dict)  # child jobs per JobStatus value, every state present
    devices: dict[str, int] = field(default_factory=dict)  # "online", "offline", "disabled"
    devices_with_pending: int = 0  # devices with a SCHEDULED, QUEUED or IN_PROGRESS job
    pending_jobs: int = 0  # SCHEDULED, QUEUED and IN_PROGRESS jobs in all queues
    deepest_queue: int = 0  # the most pending jobs any one device has


def fleet_stats() -> FleetStats:
    jobs = {s.value: 0 for s in JobStatus}
    for status, n in ChildJob.select(ChildJob.status, pw.fn.COUNT(ChildJob.seq)).group_by(ChildJob.status).tuples():
        jobs[status] = n
    devices = {"online": 0, "offline": 0, "disabled": 0}
    rows = Device.select(Device.enabled, Device.online, pw.fn.COUNT(Device.device_id)).group_by(
        Device.enabled, Device.online).tuples()
    for enabled, online, n in rows:
        devices["disabled" if not enabled else "online" if online else "offline"] += n
    depths = (ChildJob.select(pw.fn.COUNT(ChildJob.seq).alias("depth")).where(ChildJob.status.in_(PENDING))
              .group_by(ChildJob.device_id)).alias("depths")
    queues = pw.Select([depths], [pw.fn.COUNT(pw.SQL("*")), pw.fn.SUM(depths.c.depth), pw.fn.MAX(depths.c.depth)])
    count, pending, deepest = queues.bind(db).tuples().get()
    return FleetStats(jobs, devices, count or 0, pending or 0, deepest or 0)
