"""Response bodies: the stored records in the SocketXP API's PascalCase shapes."""

from __future__ import annotations

from typing import Any

from agent.protocol import JobStatus, format_time

from ..models import ChildJob
from ..store.devices import DeviceView
from ..store.jobs import JobSummary
from ..store.workflows import WorkflowView


def workflow(view: WorkflowView) -> dict[str, Any]:
    w = view.workflow
    return {
        "WorkflowId": w.workflow_id,
        "Name": w.name,
        "Command": w.command,
        "TimeoutSeconds": w.timeout_seconds,
        "SuccessOnRestart": w.success_on_restart,
        "Artifacts": list(view.artifact_ids),
        "CreatedTime": format_time(w.created),
    }


def job(s: JobSummary) -> dict[str, Any]:
    j = s.job
    return {
        "JobId": j.job_id,
        "JobName": j.name,
        j.target_field: j.target_value,
        "WorkflowId": j.workflow_id,
        "Command": j.command,
        "TimeoutSeconds": j.timeout_seconds,
        "Status": s.status.value,
        "CreatedTime": format_time(j.created),
        "StartTime": format_time(s.start_time),
        "EndTime": format_time(s.end_time),
        "Result": s.single.stdout if s.single is not None else counts(s.counts),
        **({"ExitCode": s.single.exit_code} if s.single is not None else {}),
    }


def counts(by_status: dict[str, int]) -> dict[str, int]:
    """Child jobs per state, every state named, and the total."""
    result = {status.value: by_status.get(status.value, 0) for status in JobStatus}
    result["Total"] = sum(by_status.values())
    return result


def child(c: ChildJob) -> dict[str, Any]:
    return {
        "JobId": c.job_id,
        "ParentJobId": c.parent_id,
        "DeviceId": c.device_id,
        "Command": c.parent.command,
        "Status": c.status,
        "StartTime": format_time(c.start_time),
        "EndTime": format_time(c.end_time),
        "ExitCode": c.exit_code,
        "Stdout": c.stdout,
        "Stderr": c.stderr,
        "StdoutTruncated": c.stdout_truncated,
        "StderrTruncated": c.stderr_truncated,
        "Reason": c.reason,
        "Result": c.stdout,
        "Download": download(c),
    }


def download(c: ChildJob) -> dict[str, int] | None:
    """The latest progress a DOWNLOADING report gave (kept once the command runs); None before any."""
    if c.download_total is None:
        return None
    return {"Bytes": c.download_bytes, "TotalBytes": c.download_total}


def device(d: DeviceView) -> dict[str, Any]:
    return {
        "DeviceId": d.device.device_id,
        "DeviceGroup": d.device.group,
        "Tags": list(d.tags),
        "Online": d.device.online,
        "LastSeen": format_time(d.device.last_seen),
        "Enabled": d.device.enabled,
        "PendingJobs": d.pending,
        "CreatedTime": format_time(d.device.created),
    }
