"""Artifacts: the records of uploaded files, the ones workflows name, and the copies jobs take.

The bytes are artifact_files.py's; these functions are handed what to do with them (keep an
upload, remove a file) and do it in the same transaction as the record, on the store's one thread,
so a file is never removed while a new record of the same bytes is being stored.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Callable, Iterable

import peewee as pw

from agent.protocol import PENDING_STATUSES

from ..errors import ArtifactInUse, ArtifactNotFound, InvalidRequest
from ..models import Artifact, ChildJob, Device, JobArtifact, WorkflowArtifact
from . import PENDING, arg, args, chunks, padded, prepared, write_transaction

MAX_ARTIFACTS_PER_WORKFLOW = 16
FETCHING = [s.value for s in PENDING_STATUSES]  # a device may fetch for these; not for a held (SCHEDULED) job


@dataclass(frozen=True)
class ArtifactRef:
    """One artifact of a job, as its head carries it."""

    name: str
    sha256: str
    size: int


def add_artifact(name: str, version: str, sha256: str, size: int, keep: Callable[[], None]) -> Artifact:
    """Store the record, then keep the file (rename it into place) before the commit."""
    with write_transaction():
        artifact = Artifact.create(artifact_id=str(uuid.uuid4()), name=name, version=version, sha256=sha256,
                                   size=size)
        keep()
    return artifact


def get_artifact(artifact_id: str) -> Artifact:
    artifact = Artifact.get_or_none(Artifact.artifact_id == artifact_id)
    if artifact is None:
        raise ArtifactNotFound(artifact_id)
    return artifact


def list_artifacts(limit: int, offset: int) -> tuple[list[Artifact], int]:
    """One page, newest first, and the total count."""
    page = Artifact.select().order_by(Artifact.created.desc(), Artifact.artifact_id.desc()).limit(limit).offset(offset)
    return list(page), Artifact.select().count()


def delete_artifact(artifact_id: str, remove: Callable[[str], None]) -> Artifact:
    """Delete the record, refused while a pending job needs it; remove the file once no record names it."""
    with write_transaction():
        artifact = get_artifact(artifact_id)
        needing = pending_jobs_needing(artifact_id)
        if needing:
            raise ArtifactInUse(artifact_id, needing)
        artifact.delete_instance()
        if not Artifact.select().where(Artifact.sha256 == artifact.sha256).exists():
            remove(artifact.sha256)
    return artifact


def pending_jobs_needing(artifact_id: str) -> list[str]:
    """The jobs with a child not yet final whose copy names this artifact."""
    query = (JobArtifact.select(JobArtifact.job).distinct()
             .join(ChildJob, on=(ChildJob.parent == JobArtifact.job))
             .where(JobArtifact.artifact_id == artifact_id, ChildJob.status.in_(PENDING)).tuples())
    return sorted(job_id for (job_id,) in query)


# --- workflows and jobs ---------------------------------------------------------------------------


def set_workflow_artifacts(workflow_id: str, artifact_ids: list[str]) -> None:
    """Name these artifacts, in this order; 400 naming an unknown id or a repeated file name."""
    if len(artifact_ids) > MAX_ARTIFACTS_PER_WORKFLOW:
        raise InvalidRequest(f"Artifacts: a workflow names at most {MAX_ARTIFACTS_PER_WORKFLOW} artifacts, "
                             f"got {len(artifact_ids)}")
    found = {a.artifact_id: a for a in Artifact.select().where(Artifact.artifact_id.in_(artifact_ids))}
    unknown = [a for a in artifact_ids if a not in found]
    if unknown:
        raise InvalidRequest(f"Artifacts: no artifact {', '.join(repr(a) for a in unknown)} exists")
    _check_distinct_names([found[a] for a in artifact_ids])
    rows = [{WorkflowArtifact.workflow: workflow_id, WorkflowArtifact.position: i, WorkflowArtifact.artifact_id: a}
            for i, a in enumerate(artifact_ids)]
    if rows:
        WorkflowArtifact.insert_many(rows).execute()


def _check_distinct_names(artifacts: list[Artifact]) -> None:
    names = [a.name for a in artifacts]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidRequest(f"Artifacts: two artifacts would be the same file {repeated[0]!r} on the device; "
                             f"each artifact of a workflow needs its own Name")


def workflow_artifact_ids(workflow_ids: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {w: [] for w in workflow_ids}
    for chunk in chunks(workflow_ids):
        rows = (WorkflowArtifact.select(WorkflowArtifact.workflow, WorkflowArtifact.artifact_id)
                .where(WorkflowArtifact.workflow.in_(chunk)).order_by(WorkflowArtifact.position).tuples())
        for workflow_id, artifact_id in rows:
            found[workflow_id].append(artifact_id)
    return found


def snapshot_for_job(job_id: str, workflow_id: str) -> None:
    """Copy the workflow's artifacts (name, SHA-256, size) into the job; 400 if one was deleted since."""
    ids = workflow_artifact_ids([workflow_id])[workflow_id]
    if not ids:
        return
    found = {a.artifact_id: a for a in Artifact.select().where(Artifact.artifact_id.in_(ids))}
    gone = [a for a in ids if a not in found]
    if gone:
        raise InvalidRequest(f"the workflow names artifact {gone[0]!r}, which was deleted; define the workflow "
                             f"again with artifacts that exist")
    JobArtifact.insert_many([{JobArtifact.job: job_id, JobArtifact.position: i, JobArtifact.artifact_id: a,
                              JobArtifact.name: found[a].name, JobArtifact.sha256: found[a].sha256,
                              JobArtifact.size: found[a].size} for i, a in enumerate(ids)]).execute()


def job_artifacts(parent_ids: Iterable[str]) -> dict[str, tuple[ArtifactRef, ...]]:
    """The artifacts of each job that has any, in order: one query per chunk of jobs."""
    found: dict[str, list[ArtifactRef]] = {}
    for chunk in chunks(sorted(set(parent_ids))):
        for job_id, name, sha256, size in prepared("job_artifacts", _job_artifacts, *padded(chunk)):
            found.setdefault(job_id, []).append(ArtifactRef(name, sha256, size))
    return {job_id: tuple(refs) for job_id, refs in found.items()}


def _job_artifacts(count: int) -> pw.Query:
    return (JobArtifact.select(JobArtifact.job, JobArtifact.name, JobArtifact.sha256, JobArtifact.size)
            .where(JobArtifact.job.in_(args(count))).order_by(JobArtifact.job, JobArtifact.position).tuples())


def device_may_fetch(device_id: str, child_job_id: str, sha256: str) -> bool:
    """Whether this child job is the device's, not yet final, its job names a file with this SHA-256,
    and the device is enabled: one query over three indexes (the child's job id, the copy's job and
    position, the device's id)."""
    return bool(list(prepared("device_may_fetch", _may_fetch, child_job_id, device_id, sha256)))


def _may_fetch(_: int) -> pw.Query:
    return (ChildJob.select(ChildJob.seq)
            .join(JobArtifact, on=(JobArtifact.job == ChildJob.parent))
            .join(Device, on=(Device.device_id == ChildJob.device_id), src=ChildJob)
            .where(ChildJob.job_id == arg(0), ChildJob.device_id == arg(1), ChildJob.status.in_(FETCHING),
                   JobArtifact.sha256 == arg(2), Device.enabled == True).limit(1).tuples())  # noqa: E712
