"""Workflows: a named command that jobs are submitted from."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import peewee as pw

from ..errors import WorkflowNotFound
from ..models import Workflow
from . import arg, prepared, write_transaction
from .artifacts import set_workflow_artifacts, workflow_artifact_ids


@dataclass(frozen=True)
class WorkflowView:
    workflow: Workflow
    artifact_ids: tuple[str, ...]  # the artifacts it names, in order

# Writes run in a transaction even when they are one statement: a connection lost before the COMMIT
# is then known to have changed nothing, and the store runs the call again instead of answering 503.


def create_workflow(name: str, command: str, timeout_seconds: int | None, success_on_restart: bool,
                    artifact_ids: tuple[str, ...] = ()) -> Workflow:
    """A new workflow; 400 naming an artifact id that does not exist."""
    with write_transaction():
        workflow = Workflow.create(workflow_id=str(uuid.uuid4()), name=name, command=command,
                                   timeout_seconds=timeout_seconds, success_on_restart=success_on_restart)
        set_workflow_artifacts(workflow.workflow_id, list(artifact_ids))
    return workflow


def get_workflow(workflow_id: str) -> Workflow:
    """The workflow, read with a prepared SELECT: every job submission reads one."""
    workflow = next(iter(prepared("get_workflow", _one_workflow, workflow_id)), None)
    if workflow is None:
        raise WorkflowNotFound(workflow_id)
    return workflow


def _one_workflow(_: int) -> pw.Query:
    return Workflow.select().where(Workflow.workflow_id == arg(0))


def list_workflows() -> list[Workflow]:
    return list(Workflow.select().order_by(Workflow.created, Workflow.workflow_id))


def view_workflow(workflow_id: str) -> WorkflowView:
    workflow = get_workflow(workflow_id)
    return WorkflowView(workflow, tuple(workflow_artifact_ids([workflow_id])[workflow_id]))


def view_workflows() -> list[WorkflowView]:
    found = list_workflows()
    ids = workflow_artifact_ids([w.workflow_id for w in found])
    return [WorkflowView(w, tuple(ids[w.workflow_id])) for w in found]


def delete_workflow(workflow_id: str) -> None:
    """Jobs keep their own copy of the command, so their records are untouched."""
    with write_transaction():
        if not Workflow.delete().where(Workflow.workflow_id == workflow_id).execute():
            raise WorkflowNotFound(workflow_id)
