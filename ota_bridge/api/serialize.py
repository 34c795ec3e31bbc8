"""Response bodies: the stored records in the SocketXP API's PascalCase shapes."""

from __future__ import annotations

import json
from typing import Any

from agent.protocol import JobStatus, format_time

from ..models import AttemptResult, ChildJob, Job, Rollout
from ..rollout_plan import Plan
from ..store.attempts import ChildView
from ..store.devices import DeviceView
from ..store.jobs import JobRow, JobSummary, derive_status
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
        **({"Parameters": json.loads(j.parameters)} if j.parameters is not None else {}),
        "TimeoutSeconds": j.timeout_seconds,
        "Status": s.status.value,
        "CreatedTime": format_time(j.created),
        "StartTime": format_time(s.start_time),
        "EndTime": format_time(s.end_time),
        "Result": s.single.stdout if s.single is not None else counts(s.counts),
        **({"ExitCode": s.single.exit_code} if s.single is not None else {}),
        **job_options(s),
        **({"Rollout": rollout(s.rollout, s.counts)} if s.rollout is not None else {}),
    }


def job_row(r: JobRow) -> dict[str, Any]:
    """`job` of a single-device job without OnFailure, from its one row (store.jobs.shown_job):
    the same answer, key for key, without the models and the summary."""
    by_status = {r.status: 1} if r.status is not None else {}
    status = derive_status(by_status)
    return {
        "JobId": r.job_id,
        "JobName": r.name,
        r.target_field: r.target_value,
        "WorkflowId": r.workflow_id,
        "Command": r.command,
        **({"Parameters": json.loads(r.parameters)} if r.parameters is not None else {}),
        "TimeoutSeconds": r.timeout_seconds,
        "Status": status.value,
        "CreatedTime": format_time(r.created),
        "StartTime": format_time(r.start_time),
        "EndTime": format_time(r.end_time if status.is_final else None),
        "Result": r.stdout if r.status is not None else counts(by_status),
        **({"ExitCode": r.exit_code} if r.status is not None else {}),
        **retries(r),
        **({"Rollout": rollout(r, by_status)} if r.rollout_job is not None else {}),
    }


def rollout(r: Rollout | JobRow, by_status: dict[str, int]) -> dict[str, Any]:
    """A job's rollout state: how far it got, and why it stopped if it did."""
    plan = Plan.from_json(r.plan)
    return {
        "Kind": plan.kind,
        "Wave": r.wave if plan.waves else None,
        "Waves": len(plan.waves) if plan.waves else None,
        "Released": r.released,
        "Pending": by_status.get(JobStatus.SCHEDULED.value, 0),
        "RatePerMinute": r.rate,
        "Paused": r.paused,
        "Aborted": r.aborted,
        "AbortReason": r.abort_reason,
        "Active": r.active,
        "Continuous": r.continuous,
        "CheckedAt": format_time(r.checked_at),
    }


def job_options(s: JobSummary) -> dict[str, Any]:
    """What a job shows of its Retries and OnFailure, when it has them (Parameters come with Command)."""
    j, shown = s.job, retries(s.job)
    if j.on_failure_command is not None:
        shown["OnFailure"] = {"WorkflowId": j.on_failure_workflow_id, "Command": j.on_failure_command,
                              "Result": counts(s.rollbacks or {})}
    return shown


def retries(j: Job | JobRow) -> dict[str, Any]:
    """A job's Retries, when it has them."""
    if not j.retry_max:
        return {}
    return {"Retries": {"Max": j.retry_max, "DelaySeconds": j.retry_delay_seconds, "On": j.retry_on.split(",")}}


def counts(by_status: dict[str, int]) -> dict[str, int]:
    """Child jobs per state, every state named, and the total."""
    result = {status.value: by_status.get(status.value, 0) for status in JobStatus}
    result["Total"] = sum(by_status.values())
    return result


def child(view: ChildView) -> dict[str, Any]:
    c = view.child
    rollback = c.on_failure_of is not None
    return {
        "JobId": c.job_id,
        "ParentJobId": c.parent_id,
        "DeviceId": c.device_id,
        "Command": c.parent.on_failure_command if rollback else c.parent.command,
        "Status": c.status,
        **attempt_fields(c),
        "Reason": c.reason,
        "Result": c.stdout,
        "Download": download(c),
        "Attempt": c.attempt,
        "Attempts": [attempt_fields(a, a.number) for a in view.earlier] + [attempt_fields(c, c.attempt)],
        **({"OnFailureOf": c.on_failure_of} if rollback else {}),
        **({"OnFailureJobId": view.rollback_job_id} if view.rollback_job_id else {}),
    }


def attempt_fields(a: ChildJob | AttemptResult, number: int | None = None) -> dict[str, Any]:
    """An attempt's result: the child's own fields (its latest attempt), or an earlier attempt's row."""
    return {
        **({"Attempt": number, "Status": a.status} if number is not None else {}),
        "StartTime": format_time(a.start_time),
        "EndTime": format_time(a.end_time),
        "ExitCode": a.exit_code,
        "Stdout": a.stdout,
        "Stderr": a.stderr,
        "StdoutTruncated": a.stdout_truncated,
        "StderrTruncated": a.stderr_truncated,
        **({"Reason": a.reason} if number is not None else {}),
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
