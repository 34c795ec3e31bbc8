"""The wire contract between the ota-bridge service and device agents.

Every topic name, message key and status value lives here, and nowhere else.
Standard library only: the agent runs on small boards and imports this module.
See docs/protocol.md for the prose version of this contract.
"""

from __future__ import annotations

import enum
import json
import re
from datetime import datetime, timezone
from typing import Any

DEFAULT_PREFIX = "ota/v1"

# A device id is one MQTT topic level and a file name on the device:
# no '/', '+', '#', NUL or whitespace, and not '.' or '..'.
DEVICE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
# New registrations also refuse ':', which ends the username in Mosquitto's password file
# (`user:hash`); ids registered with one before still work everywhere else.
NEW_DEVICE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)

# The pending list on the queue topic shows at most this many jobs; "Total" counts them all.
QUEUE_LIST_LIMIT = 100
# ... and the first characters of each command (the head always carries the whole command).
QUEUE_COMMAND_PREVIEW = 200
# The longest command a job may carry, in characters; a head stays far below the agent's limit.
MAX_COMMAND_CHARS = 16 * 1024
# The largest status message the service accepts: two capped streams, JSON-escaped, and the rest.
MAX_STATUS_MESSAGE_BYTES = 1024 * 1024

# MQTT identities that are not devices, so no device may take these ids.
SERVICE_CLIENT_ID = "ota-bridge-service"  # the service's client id (its session holds every subscription)
OPERATOR_USERNAME = "api"  # operators watching topics log in with this name and an API token
RESERVED_DEVICE_IDS = frozenset({SERVICE_CLIENT_ID, OPERATOR_USERNAME})
# Default caps for captured output, per stream, in bytes.
OUTPUT_CAP_BYTES = 64 * 1024
# Default command timeout when neither the workflow nor the job sets one.
DEFAULT_TIMEOUT_SECONDS = 3600
# A job id, as the service makes them and accepts them in a status report.
JOB_ID_PATTERN = r"[A-Za-z0-9-]{1,64}"


class JobStatus(str, enum.Enum):
    """The state of one child job (one command on one device)."""

    SCHEDULED = "SCHEDULED"  # held by the service: its rollout, schedule or a retry delay has not released it yet
    QUEUED = "QUEUED"  # waiting in the device's queue
    DOWNLOADING = "DOWNLOADING"  # the device is fetching the job's artifacts (the command has not started)
    IN_PROGRESS = "IN_PROGRESS"  # the device has started the command
    SUCCEEDED = "SUCCEEDED"  # the command exited 0
    FAILED = "FAILED"  # the command exited non-zero, or could not be started
    TIMED_OUT = "TIMED_OUT"  # ran past its timeout: killed by the agent, or the device went silent (service)
    CANCELED = "CANCELED"  # canceled by an operator or the device's deletion; a running command was killed
    INTERRUPTED = "INTERRUPTED"  # the agent restarted while the command ran; it is not run again
    REJECTED = "REJECTED"  # the agent refused the job (bad signature, another device's, outside its policy)

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELED, JobStatus.INTERRUPTED,
     JobStatus.REJECTED}
)
# Released and not final: what a device may be sent (QUEUED) or is running.
PENDING_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.DOWNLOADING, JobStatus.IN_PROGRESS})
# Not final: the pending ones and the held ones. A SCHEDULED job keeps its place in its device's
# queue (later jobs wait behind it), but while it is the first of them the device is sent nothing.
UNFINISHED_STATUSES = PENDING_STATUSES | {JobStatus.SCHEDULED}

# The allowed transitions of a child job; the service and the tests both read this table.
# A final state has no way out: a duplicate or late update never moves a job backwards.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    # Only the service moves a held job: it releases it, or an operator (or an abort) cancels it.
    JobStatus.SCHEDULED: frozenset({JobStatus.QUEUED, JobStatus.CANCELED}),
    # -> SCHEDULED: only the service, when an attempt ended FAILED or TIMED_OUT and the job's
    # Retries allow another: the child keeps its place (its Seq) and waits for its retry delay.
    JobStatus.QUEUED: frozenset({JobStatus.SCHEDULED, JobStatus.DOWNLOADING, JobStatus.IN_PROGRESS}
                                | FINAL_STATUSES),
    # DOWNLOADING repeats: each report carries the download's progress.
    JobStatus.DOWNLOADING: frozenset({JobStatus.SCHEDULED, JobStatus.DOWNLOADING, JobStatus.IN_PROGRESS}
                                     | FINAL_STATUSES),
    JobStatus.IN_PROGRESS: frozenset({JobStatus.SCHEDULED} | FINAL_STATUSES),
    **{status: frozenset() for status in FINAL_STATUSES},
}
# The transitions only the service makes; a device's report never asks for them.
SERVICE_ONLY = frozenset({(current, JobStatus.SCHEDULED) for current in PENDING_STATUSES})

# The states a device may report about its own job (CANCELED is reported when the
# head moved past a running job and the agent killed it). Never SCHEDULED, nor about a SCHEDULED job.
DEVICE_REPORTABLE = frozenset({JobStatus.DOWNLOADING, JobStatus.IN_PROGRESS} | FINAL_STATUSES)


def can_transition(current: JobStatus, new: JobStatus) -> bool:
    return new in TRANSITIONS[current]


class Presence(str, enum.Enum):
    """The retained presence value of a device."""

    ONLINE = "online"  # published by the agent when it connects
    OFFLINE = "offline"  # the agent's last will, and published on a clean shutdown


# --- topics ---------------------------------------------------------------------------------


class Topics:
    """Topic names under one prefix. Per device: .../devices/{DeviceId}/{leaf}."""

    JOB = "job"  # service -> device, retained QoS 1: the job the device must run next
    QUEUE = "queue"  # service -> device, retained QoS 1: the whole pending list, in order
    STATUS = "status"  # device -> service, QoS 1: job updates (IN_PROGRESS, then final)
    PRESENCE = "presence"  # device -> everyone, retained QoS 1: online/offline (last will)

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        prefix = prefix.strip("/")
        if not prefix or any(c in prefix for c in "+#\0"):
            raise ValueError(f"invalid topic prefix {prefix!r}")
        self.prefix = prefix

    def device(self, device_id: str, leaf: str) -> str:
        return f"{self.prefix}/devices/{device_id}/{leaf}"

    def job(self, device_id: str) -> str:
        return self.device(device_id, self.JOB)

    def queue(self, device_id: str) -> str:
        return self.device(device_id, self.QUEUE)

    def status(self, device_id: str) -> str:
        return self.device(device_id, self.STATUS)

    def presence(self, device_id: str) -> str:
        return self.device(device_id, self.PRESENCE)

    def all_devices(self, leaf: str) -> str:
        """A subscription filter for one leaf of every device."""
        return self.device("+", leaf)

    def parse(self, topic: str) -> tuple[str, str] | None:
        """Split a device topic into (device_id, leaf); None if it is not one."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) != 2 or not is_valid_device_id(parts[0]):
            return None
        return parts[0], parts[1]


def is_valid_device_id(value: str) -> bool:
    return bool(_DEVICE_ID_RE.fullmatch(value)) and value not in RESERVED_DEVICE_IDS


# --- message keys ---------------------------------------------------------------------------


class Key:
    """JSON keys of MQTT messages (PascalCase, like the REST API)."""

    JOB_ID = "JobId"
    PARENT_JOB_ID = "ParentJobId"
    JOB_NAME = "JobName"
    DEVICE_ID = "DeviceId"
    COMMAND = "Command"
    TIMEOUT_SECONDS = "TimeoutSeconds"
    SUCCESS_ON_RESTART = "SuccessOnRestart"
    SEQ = "Seq"
    FLOOR = "Floor"
    ISSUED_AT = "IssuedAt"
    SUBMITTED_TIME = "SubmittedTime"
    STATUS = "Status"
    EXIT_CODE = "ExitCode"
    STDOUT = "Stdout"
    STDERR = "Stderr"
    STDOUT_TRUNCATED = "StdoutTruncated"
    STDERR_TRUNCATED = "StderrTruncated"
    START_TIME = "StartTime"
    END_TIME = "EndTime"
    REASON = "Reason"
    JOBS = "Jobs"
    TOTAL = "Total"
    COMMAND_TRUNCATED = "CommandTruncated"
    PRESENCE = "Presence"
    TIME = "Time"
    AGENT_VERSION = "AgentVersion"
    SIGNATURE = "Signature"
    ATTEMPT = "Attempt"  # which attempt of the job this head asks for (1 when absent)
    ARTIFACTS = "Artifacts"  # the files the agent fetches and checks before the command runs
    PROGRESS = "Progress"  # a DOWNLOADING report: {"Bytes": done, "TotalBytes": all}


class ArtifactKey:
    """JSON keys of one entry of a head's Artifacts list (every one is signed)."""

    SHA256 = "Sha256"  # 64 lowercase hex digits
    SIZE = "Size"  # bytes
    NAME = "Name"  # the file's name in the command's artifact directory
    URL = "Url"  # where the agent fetches it (http or https)


class ProgressKey:
    """JSON keys of a DOWNLOADING report's Progress object."""

    BYTES = "Bytes"  # bytes of the job's artifacts on the device so far
    TOTAL_BYTES = "TotalBytes"  # bytes of all the job's artifacts


# --- signed jobs ----------------------------------------------------------------------------

# The service signs every head with Ed25519; the agent verifies before it acts on anything.
SIGNATURE_ALGORITHM = "Ed25519"
SIGNATURE_DOMAIN = "ota-bridge job v2"  # the first line of a job head's signed bytes
# ... of a head that carries an Attempt or Artifacts (a v2 agent cannot verify it, so never runs it)
SIGNATURE_DOMAIN_V3 = "ota-bridge job v3"
IDLE_SIGNATURE_DOMAIN = "ota-bridge idle v2"  # ... and of an idle head's (no job pending)
# An agent with no state (no Floor yet) runs only heads issued within this many seconds of its clock.
HEAD_VALIDITY_SECONDS = 24 * 3600
# The DER prefix that makes a raw 32-byte Ed25519 public key an RFC 8410 SubjectPublicKeyInfo.
ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


def is_idle_head(head: dict[str, Any]) -> bool:
    """An idle head says "nothing pending" and carries no JobId."""
    return head.get(Key.JOB_ID) is None


def signing_bytes(head: dict[str, Any]) -> bytes:
    """The bytes the service signs for a head: every field that decides what runs, where and when.

    One field a line, UTF-8, in this order; the command comes last because it may hold newlines
    (no other field can). An idle head (no JobId) signs its own short form. A head with an Attempt
    or Artifacts signs the v3 form: the v2 lines, then the attempt, the number of artifacts and
    one line per artifact (see _artifact_line) before the command. Raises KeyError or TypeError for
    a head that lacks a field or holds one of the wrong type.
    """
    if is_idle_head(head):
        fields: tuple[str, ...] = (
            IDLE_SIGNATURE_DOMAIN,
            _line(head[Key.DEVICE_ID]),
            str(int(head[Key.FLOOR])),
            _line(head[Key.ISSUED_AT]),
        )
    else:
        common = (
            _line(head[Key.DEVICE_ID]),
            _line(head[Key.JOB_ID]),
            str(int(head[Key.SEQ])),
            str(int(head[Key.FLOOR])),
            _line(head[Key.ISSUED_AT]),
            str(int(head[Key.TIMEOUT_SECONDS])),
            "1" if head[Key.SUCCESS_ON_RESTART] is True else "0",
        )
        if head.get(Key.ATTEMPT) is None and head.get(Key.ARTIFACTS) is None:
            fields = (SIGNATURE_DOMAIN, *common, str(head[Key.COMMAND]))
        else:
            artifacts = head.get(Key.ARTIFACTS) or []
            if not isinstance(artifacts, list):
                raise TypeError("Artifacts must be a list")
            fields = (SIGNATURE_DOMAIN_V3, *common, str(_count(head.get(Key.ATTEMPT, 1), 1)),
                      str(len(artifacts)), *(_artifact_line(a) for a in artifacts), str(head[Key.COMMAND]))
    return "\n".join(fields).encode("utf-8")


ARTIFACT_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}"
_SHA256_PATTERN = r"[0-9a-f]{64}"  # both compiled by their first use (re caches them), not at every agent start


def _count(value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise TypeError(f"expected an integer of at least {least}")
    return value


def _artifact_line(artifact: Any) -> str:
    """One signed line for one artifact: SHA-256, size, name and URL, separated by spaces."""
    if not isinstance(artifact, dict):
        raise TypeError("an artifact must be an object")
    sha256, name, url = (artifact[ArtifactKey.SHA256], artifact[ArtifactKey.NAME], artifact[ArtifactKey.URL])
    if not isinstance(sha256, str) or not re.fullmatch(_SHA256_PATTERN, sha256):
        raise TypeError("an artifact's Sha256 must be 64 lowercase hex digits")
    if not isinstance(name, str) or not re.fullmatch(ARTIFACT_NAME_PATTERN, name):
        raise TypeError("an artifact's Name must match " + ARTIFACT_NAME_PATTERN)
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or any(c.isspace() for c in url):
        raise TypeError("an artifact's Url must be an http(s) URL without spaces")
    return f"{sha256} {_count(artifact[ArtifactKey.SIZE], 0)} {name} {url}"


def _line(value: Any) -> str:
    if not isinstance(value, str) or "\n" in value:
        raise TypeError("a signed field must be a string without newlines")
    return value


# --- time -----------------------------------------------------------------------------------


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def format_time(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with millisecond precision and a 'Z' suffix."""
    if value is None:
        return None
    if value.tzinfo is None:  # naive UTC, as the service stores times: no conversion to make
        return value.isoformat(timespec="milliseconds") + "Z"
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: Any) -> datetime | None:
    """Parse an ISO 8601 time into an aware UTC datetime; None if absent or malformed."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


# --- encoding -------------------------------------------------------------------------------


def encode(message: dict[str, Any]) -> bytes:
    """Compact JSON, UTF-8. Every message on every topic is one JSON object."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class MessageError(ValueError):
    """A message that is not what the protocol says it must be."""


def decode(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """Decode one JSON object, refusing anything over max_bytes or not an object."""
    if len(payload) > max_bytes:
        raise MessageError(f"message of {len(payload)} bytes is over the limit of {max_bytes}")
    try:
        message = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise MessageError(f"message is not UTF-8 JSON: {e}") from e
    except RecursionError as e:
        raise MessageError("message is nested too deeply") from e
    if not isinstance(message, dict):
        raise MessageError("message is not a JSON object")
    # JSON may escape lone surrogates ("\ud800"), which no UTF-8 text can hold. Strict UTF-8
    # decoding refuses them unescaped, so only a message with a "\u" escape can hold one: the
    # whole message is checked only then (re-encoding every message doubled the cost of decode).
    if b"\\u" in payload:
        try:
            json.dumps(message, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise MessageError(f"message holds text that is not valid Unicode: {e.reason}") from e
    return message
