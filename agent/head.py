"""The head of this device's job queue, as the service publishes it on the job topic.

parse_head reads what a head says; whether the service signed it (job_signature), whether it
is for this device and may run here is for the agent (daemon) to check before it acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import job_signature, protocol
from .protocol import Key, MessageError

HEAD_MAX_BYTES = 256 * 1024


@dataclass(frozen=True)
class Head:
    """The job the service wants this device to run next."""

    job_id: str
    command: str
    timeout_seconds: float
    success_on_restart: bool
    seq: int | None
    device_id: Any = None  # the head's DeviceId, checked only once its signature verifies
    signature: Any = None  # the head's Signature, as it came
    signed_content: bytes | None = field(default=None, repr=False)  # what the signature must sign


def parse_head(payload: bytes, default_timeout: float) -> Head | None:
    """The head in a job-topic payload; None when the payload is empty (queue empty).

    Raises MessageError for anything that is not a head at all. Whose head it is, and whether
    the service signed it, is for the agent to check before it acts on it.
    """
    if not payload:
        return None
    message = protocol.decode(payload, HEAD_MAX_BYTES)
    job_id, command = message.get(Key.JOB_ID), message.get(Key.COMMAND)
    if not isinstance(job_id, str) or not job_id:
        raise MessageError(f"{Key.JOB_ID} is missing or not a string")
    if not isinstance(command, str) or not command:
        raise MessageError(f"job {job_id}: {Key.COMMAND} is missing or not a string")
    seq = message.get(Key.SEQ)
    return Head(
        job_id=job_id,
        command=command,
        timeout_seconds=_timeout(message.get(Key.TIMEOUT_SECONDS), job_id, default_timeout),
        success_on_restart=message.get(Key.SUCCESS_ON_RESTART) is True,
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        device_id=message.get(Key.DEVICE_ID),
        signature=message.get(Key.SIGNATURE),
        signed_content=job_signature.signed_content(message),
    )


def _timeout(value: Any, job_id: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise MessageError(f"job {job_id}: {Key.TIMEOUT_SECONDS} is {value!r}, expected a number above 0")
    return float(value)

