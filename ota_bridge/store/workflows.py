"""Workflows: a named command that jobs are submitted from."""

from __future__ import annotations

import uuid

from ..errors import WorkflowNotFound
from ..models import Workflow
from . import write_transaction

# Writes run in a transaction even when they are one statement: a connection lost before the COMMIT
# is then known to have changed nothing, and the store runs the call again instead of answering 503.


def create_workflow(name: str, command: str, timeout_seconds: int | None, success_on_restart: bool) -> Workflow:
    with write_transaction():
        return Workflow.create(workflow_id=str(uuid.uuid4()), name=name, command=command,
                               timeout_seconds=timeout_seconds, success_on_restart=success_on_restart)


def get_workflow(workflow_id: str) -> Workflow:
    workflow = Workflow.get_or_none(Workflow.workflow_id == workflow_id)
    if workflow is None:
        raise WorkflowNotFound(workflow_id)
    return workflow


def list_workflows() -> list[Workflow]:
    return list(Workflow.select().order_by(Workflow.created, Workflow.workflow_id))


def delete_workflow(workflow_id: str) -> None:
    """Jobs keep their own copy of the command, so their records are untouched."""
    with write_transaction():
        if not Workflow.delete().where(Workflow.workflow_id == workflow_id).execute():
            raise WorkflowNotFound(workflow_id)
