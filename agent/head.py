"""The head of this device's job queue, as the service publishes it on the job topic.

A head is either a job head (the job the device must run next) or an idle head (no JobId:
nothing is pending). Both carry the service's Floor and IssuedAt and are signed. parse_head
reads what a head says; whether the service signed it (job_signature), whether it is for this
device, recent enough and may run here is for the agent (daemon) to check before it acts on it.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, NamedTuple

from . import job_signature, protocol
from .artifact_cache import Artifact
from .protocol import Key, MessageError
from .untrusted import shown

HEAD_MAX_BYTES = 256 * 1024
_JOB_ID_RE = re.compile(protocol.JOB_ID_PATTERN)


class Head(NamedTuple):
    """What the service wants this device to do next: run job_id, or nothing (job_id None).

    An immutable record: a NamedTuple, not a dataclass, as the agent's records are (cheaper to
    define at start-up: bench/profile_notes.md, agent-exec-until-online)."""

    job_id: str | None
    command: str
    timeout_seconds: float
    success_on_restart: bool
    seq: int | None
    floor: int | None = None  # every Seq at or below it is done or canceled
    issued_at: datetime | None = None  # when the service signed it (its clock)
    device_id: Any = None  # the head's DeviceId, checked only once its signature verifies
    signature: Any = None  # the head's Signature, as it came
    signed_content: bytes | None = None  # what the signature must sign
    labels: str = ""  # the unsigned ParentJobId and JobName, quoted and capped, only for logs
    attempt: int = 1  # which attempt of the job (Retries); signed (the v3 form) when above 1
    artifacts: tuple[Artifact, ...] = ()  # fetched and checked before the command runs (agent/download.py)

    @property
    def is_idle(self) -> bool:
        return self.job_id is None

    @property
    def name(self) -> str:
        """How logs name it: the job id quoted and capped, since it may not be verified yet."""
        return "the idle head" if self.job_id is None else f"job {shown(self.job_id)}"


def parse_head(payload: bytes, default_timeout: float) -> Head:
    """The head in a job-topic payload.

    Raises MessageError for anything that is not a head at all: an empty payload (the service
    never sends one to a registered device: it is unsigned), a JobId that is not a job id (no
    report about it could be accepted), a job without a command. Whose head it is, and whether
    the service signed it, is for the agent to check before it acts on it.
    """
    if not payload:
        raise MessageError("an empty payload is not a head (it is unsigned; the service sends a signed idle head)")
    message = protocol.decode(payload, HEAD_MAX_BYTES)
    job_id, command, seq = message.get(Key.JOB_ID), message.get(Key.COMMAND), _whole(message.get(Key.SEQ))
    floor = _whole(message.get(Key.FLOOR))
    if job_id is None and command is not None:
        raise MessageError(f"{Key.JOB_ID} is missing from a head with a {Key.COMMAND}")
    if job_id is not None and (not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id)):
        raise MessageError(f"{Key.JOB_ID} {str(job_id)[:80]!r} is not a job id ({protocol.JOB_ID_PATTERN})")
    if job_id is not None and (not isinstance(command, str) or not command):
        raise MessageError(f"job {job_id}: {Key.COMMAND} is missing or not a string")
    if job_id is not None and seq is not None and floor is not None and floor >= seq:
        raise MessageError(f"job {job_id}: its {Key.FLOOR} {floor} is not below its {Key.SEQ} {seq}")
    return Head(
        job_id=job_id,
        command=command if job_id is not None else "",
        timeout_seconds=_timeout(message.get(Key.TIMEOUT_SECONDS), job_id, default_timeout),
        success_on_restart=message.get(Key.SUCCESS_ON_RESTART) is True,
        seq=seq,
        floor=floor,
        issued_at=protocol.parse_time(message.get(Key.ISSUED_AT)),
        device_id=message.get(Key.DEVICE_ID),
        signature=message.get(Key.SIGNATURE),
        signed_content=(signed := job_signature.signed_content(message)),
        labels=_labels(message),
        attempt=_whole(message.get(Key.ATTEMPT)) or 1,  # a bad Attempt leaves the head unsigned: refused
        artifacts=_artifacts(message) if signed is not None else (),
    )


def _artifacts(message: dict[str, object]) -> tuple[Artifact, ...]:
    """The head's Artifacts, once signed_content has found each well formed (else the head is refused)."""
    raw = message.get(Key.ARTIFACTS)
    return tuple(Artifact.from_json(entry) for entry in raw) if isinstance(raw, list) else ()


def _labels(message: dict[str, object]) -> str:
    """How logs show the parent job and the job's name: not signed, so quoted, capped, and said so."""
    parent, name = message.get(Key.PARENT_JOB_ID), message.get(Key.JOB_NAME)
    if parent is None and name is None:
        return ""
    return f"parent job {shown(parent)}, name {shown(name)} (unsigned labels)"


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _timeout(value: Any, job_id: str | None, default: float) -> float:
    if value is None or job_id is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise MessageError(f"job {job_id}: {Key.TIMEOUT_SECONDS} is {value!r}, expected a number above 0")
    return float(value)
