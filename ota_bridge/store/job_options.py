"""What a job may add to its workflow (all optional): Parameters, Retries and OnFailure, as Job columns.

A job without them is stored exactly as before: the workflow's command, no retries, no rollback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent.protocol import DEFAULT_TIMEOUT_SECONDS, JobStatus

from .. import parameters
from ..errors import InvalidRequest
from ..models import Workflow
from .artifacts import workflow_artifact_ids
from .workflows import get_workflow

MAX_RETRIES = 10
MAX_RETRY_DELAY_SECONDS = 24 * 3600
RETRYABLE = (JobStatus.FAILED.value, JobStatus.TIMED_OUT.value)  # the end states of an attempt a retry may follow


@dataclass(frozen=True)
class Retries:
    max: int  # retries after the first attempt: a child runs at most max + 1 attempts
    delay_seconds: int = 0
    on: tuple[str, ...] = RETRYABLE


@dataclass(frozen=True)
class JobOptions:
    parameters: dict[str, str] | None = None
    retries: Retries | None = None
    on_failure: str | None = None  # the rollback workflow's id


NO_OPTIONS = JobOptions()  # a job as before: the workflow's command, no retries, no rollback


def job_columns(workflow: Workflow, options: JobOptions) -> dict[str, Any]:
    """The Job columns the options set: the commands with their parameters filled in, the retry
    policy, the rollback workflow's snapshot. Raises BadParameters, WorkflowNotFound,
    InvalidRequest (a rollback workflow that names artifacts)."""
    rollback = get_workflow(options.on_failure) if options.on_failure is not None else None
    if rollback is not None and workflow_artifact_ids([rollback.workflow_id]).get(rollback.workflow_id):
        raise InvalidRequest(f"OnFailure: workflow {rollback.workflow_id!r} names artifacts; a rollback runs its "
                             f"command without fetching any, so name a workflow without Artifacts")
    commands = {"the workflow's command": workflow.command}
    if rollback is not None:
        commands["the OnFailure workflow's command"] = rollback.command
    filled = list(parameters.render(commands, options.parameters).values())
    columns: dict[str, Any] = {"command": filled[0]}
    if options.parameters is not None:
        columns["parameters"] = json.dumps(options.parameters, ensure_ascii=False, sort_keys=True)
    if options.retries is not None:
        columns.update(retry_max=options.retries.max, retry_delay_seconds=options.retries.delay_seconds,
                       retry_on=",".join(options.retries.on))
    if rollback is not None:
        columns.update(on_failure_workflow_id=rollback.workflow_id, on_failure_command=filled[1],
                       on_failure_timeout_seconds=rollback.timeout_seconds or DEFAULT_TIMEOUT_SECONDS,
                       on_failure_success_on_restart=rollback.success_on_restart)
    return columns
