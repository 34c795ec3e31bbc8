"""The service's side of the wire contract: build queue messages, validate device messages.

Everything a device sends is checked here, at the boundary; deeper code gets frozen Updates.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

from agent.protocol import (
    DEVICE_REPORTABLE,
    JOB_ID_PATTERN,
    MAX_STATUS_MESSAGE_BYTES,
    OUTPUT_CAP_BYTES,
    QUEUE_COMMAND_PREVIEW,
    QUEUE_LIST_LIMIT,
    ArtifactKey,
    JobStatus,
    Key,
    MessageError,
    Presence,
    ProgressKey,
    decode,
    encode,
    format_time,
    parse_time,
    signing_bytes,
)

from .models import naive_utc
from .store.queues import DeviceQueue, QueueEntry
from .store.updates import Update

MAX_REASON_CHARS = 2000
_JOB_ID_RE = re.compile(JOB_ID_PATTERN)


ArtifactUrl = Callable[[str, str, str], str]  # (device id, child job id, sha256) -> where the device fetches it


def head_message(device_id: str, entry: QueueEntry | None, floor: int, issued_at: datetime,
                 sign: Callable[[bytes], str] | None = None, artifact_url: ArtifactUrl | None = None) -> bytes:
    """The retained job message, signed: the one job the device must run next, or (entry None)
    the idle head that says nothing is pending. floor: every Seq of the device at or below it is final.

    A job with artifacts carries them (SHA-256, size, name, URL), signed in the v3 form; a job
    without stays the v2 head it always was, byte for byte."""
    head: dict[str, Any] = {Key.DEVICE_ID: device_id, Key.FLOOR: floor, Key.ISSUED_AT: _time_text(issued_at)}
    if entry is not None:
        head = {
            Key.JOB_ID: entry.job_id,
            Key.PARENT_JOB_ID: entry.parent_id,
            Key.JOB_NAME: entry.name,
            Key.DEVICE_ID: device_id,
            Key.COMMAND: entry.command,
            Key.TIMEOUT_SECONDS: entry.timeout_seconds,
            Key.SUCCESS_ON_RESTART: entry.success_on_restart,
            Key.SEQ: entry.seq,
            Key.FLOOR: floor,
            Key.ISSUED_AT: _time_text(issued_at),
            Key.SUBMITTED_TIME: _time_text(entry.submitted),
            **({Key.ATTEMPT: entry.attempt} if entry.attempt > 1 else {}),  # attempt 1 stays the v2 head
        }
        if entry.artifacts:
            head[Key.ARTIFACTS] = _artifacts(device_id, entry, artifact_url)
    if sign is not None:
        head[Key.SIGNATURE] = sign(signing_bytes(head))
    return encode(head)


@functools.lru_cache(maxsize=4096)
def _time_text(value: datetime) -> str | None:
    """format_time, kept: a batch of heads shares its IssuedAt, a group job's heads their SubmittedTime."""
    return format_time(value)


def _artifacts(device_id: str, entry: QueueEntry, artifact_url: ArtifactUrl | None) -> list[dict[str, Any]]:
    if artifact_url is None:
        raise ValueError("a head with artifacts needs an artifact_url")
    return [{ArtifactKey.SHA256: a.sha256, ArtifactKey.SIZE: a.size, ArtifactKey.NAME: a.name,
             ArtifactKey.URL: artifact_url(device_id, entry.job_id, a.sha256)} for a in entry.artifacts]


def queue_message(queue: DeviceQueue) -> bytes:
    """The retained pending list, head first; empty when nothing is pending. A held job shows as
    SCHEDULED with its Reason (the head is then the idle head: see DeviceQueue.head).

    The list is republished whole on every change of the device's queue (up to QUEUE_LIST_LIMIT
    entries), while usually only its head changed: each entry's JSON is kept (_LIST_ENTRIES) and
    joined, byte for byte what encoding the whole message at once gives."""
    if not queue.entries:
        return b""
    head = encode({Key.DEVICE_ID: queue.device_id, Key.TOTAL: queue.total, Key.JOBS: []})
    return b"".join([head[:-2], b",".join(map(_list_entry, queue.entries[:QUEUE_LIST_LIMIT])), b"]}"])


_LIST_ENTRIES: dict[tuple[Any, ...], bytes] = {}  # what an entry shows -> its JSON in the list
_LIST_ENTRIES_MAX = 65536  # then forgotten all at once: a cache, never needed for correctness
_HELD = JobStatus.SCHEDULED.value
_JSON_KEPT = "_list_json"


def _list_entry(e: QueueEntry) -> bytes:
    # An entry object stays the same while a remembered queue moves along (only the head's changes):
    # its JSON is kept on it too (a QueueEntry is frozen, so it cannot go stale), one lookup instead
    # of building the key. This runs 100 times per list.
    cached = e.__dict__.get(_JSON_KEPT)
    if cached is not None:
        return cached
    held = e.status == _HELD  # QueueEntry.held, without the property call
    key = (e.job_id, e.name, e.command, e.status, e.reason if held else None, e.seq)
    cached = _LIST_ENTRIES.get(key)
    if cached is None:
        if len(_LIST_ENTRIES) >= _LIST_ENTRIES_MAX:
            _LIST_ENTRIES.clear()
        cached = _LIST_ENTRIES[key] = encode({
            Key.JOB_ID: e.job_id,
            Key.JOB_NAME: e.name,
            Key.COMMAND: e.command[:QUEUE_COMMAND_PREVIEW],
            **({Key.COMMAND_TRUNCATED: True} if len(e.command) > QUEUE_COMMAND_PREVIEW else {}),
            Key.STATUS: e.status,
            **({Key.REASON: e.reason} if held else {}),
            Key.SEQ: e.seq,
        })
    e.__dict__[_JSON_KEPT] = cached
    return cached


@dataclass(frozen=True)
class PresenceReport:
    device_id: str
    online: bool


def parse_presence(device_id: str, payload: bytes) -> PresenceReport:
    message = decode(payload, MAX_STATUS_MESSAGE_BYTES)
    value = message.get(Key.PRESENCE)
    if value not in {p.value for p in Presence}:
        raise MessageError(f"{Key.PRESENCE} must be 'online' or 'offline', got {value!r}")
    return PresenceReport(device_id, value == Presence.ONLINE.value)


_PROGRESS = frozenset({JobStatus.IN_PROGRESS.value, JobStatus.DOWNLOADING.value})


def is_progress_report(payload: bytes) -> bool:
    """Whether a status message reports a job's progress (IN_PROGRESS, DOWNLOADING), not its end;
    False for anything else, a malformed message included (parse_update says what is wrong)."""
    try:
        return decode(payload, MAX_STATUS_MESSAGE_BYTES).get(Key.STATUS) in _PROGRESS
    except MessageError:
        return False


def parse_update(device_id: str, payload: bytes) -> Update:
    """Validate a device's job update; raises MessageError naming the bad field."""
    message = decode(payload, MAX_STATUS_MESSAGE_BYTES)
    status = _status(message.get(Key.STATUS))
    stdout, stdout_cut = _output(message, Key.STDOUT)
    stderr, stderr_cut = _output(message, Key.STDERR)
    job_id = message.get(Key.JOB_ID)
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise MessageError(f"{Key.JOB_ID} must be a job id (letters, digits and '-'), got {str(job_id)[:80]!r}")
    return Update(
        device_id=device_id,
        job_id=job_id,
        status=status,
        exit_code=_exit_code(message.get(Key.EXIT_CODE)),
        stdout=stdout,
        stderr=stderr,
        stdout_truncated=stdout_cut or message.get(Key.STDOUT_TRUNCATED) is True,
        stderr_truncated=stderr_cut or message.get(Key.STDERR_TRUNCATED) is True,
        start_time=_time(message, Key.START_TIME),
        end_time=_time(message, Key.END_TIME),
        reason=_text(message, Key.REASON, MAX_REASON_CHARS).replace("\x00", "\ufffd") or None,
        attempt=_attempt(message.get(Key.ATTEMPT)),
        progress=_progress(message.get(Key.PROGRESS)) if status is JobStatus.DOWNLOADING else None,
    )


def _progress(value: Any) -> tuple[int, int] | None:
    """A DOWNLOADING report's {"Bytes": done, "TotalBytes": all}; None when absent."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MessageError(f"{Key.PROGRESS} must be an object {{\"Bytes\": n, \"TotalBytes\": m}}")
    done, total = value.get(ProgressKey.BYTES), value.get(ProgressKey.TOTAL_BYTES)
    for name, number in ((ProgressKey.BYTES, done), (ProgressKey.TOTAL_BYTES, total)):
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 2**63:
            raise MessageError(f"{Key.PROGRESS}.{name} must be a whole number of bytes")
    return done, total


def _status(value: Any) -> JobStatus:
    try:
        status = JobStatus(value)
    except ValueError:
        raise MessageError(f"{Key.STATUS} {value!r} is not a job status") from None
    if status not in DEVICE_REPORTABLE:
        raise MessageError(f"a device cannot report {Key.STATUS} {status.value}")
    return status


def _text(message: dict[str, Any], key: str, limit: int) -> str:
    value = message.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MessageError(f"{key} must be a string or null")
    return value[:limit]


def _output(message: dict[str, Any], key: str) -> tuple[str, bool]:
    """A captured stream, capped again here (the tail is kept, like the agent does)."""
    value = message.get(key) or ""
    if not isinstance(value, str):
        raise MessageError(f"{key} must be a string")
    value = value.replace("\x00", "\ufffd")  # no database stores NUL in text (PostgreSQL refuses it)
    if len(value.encode("utf-8")) <= OUTPUT_CAP_BYTES:
        return value, False
    tail = value.encode("utf-8")[-OUTPUT_CAP_BYTES:].decode("utf-8", errors="ignore")
    return tail, True


def _exit_code(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**31) <= value < 2**31:
        raise MessageError(f"{Key.EXIT_CODE} must be an integer or null")
    return value


def _attempt(value: Any) -> int | None:
    """The attempt a report is about; None when absent (attempt 1, or an agent that knows no attempts)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
        raise MessageError(f"{Key.ATTEMPT} must be a whole number of at least 1, or absent")
    return value


def _time(message: dict[str, Any], key: str) -> datetime | None:
    value = message.get(key)
    parsed = parse_time(value)
    if value is not None and parsed is None:
        raise MessageError(f"{key} {value!r} is not an ISO 8601 time")
    return naive_utc(parsed)
