"""The service's exceptions: one root, subclasses that carry what went wrong.

The HTTP layer maps each to a status code in one place (ota_bridge/api/errors.py).
"""

from __future__ import annotations


class OtaBridgeError(Exception):
    """Root of every error ota-bridge raises on purpose."""

    status = 500
    title = "Internal error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(OtaBridgeError):
    status = 404
    title = "Not found"

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"{kind} {ident!r} does not exist")
        self.kind = kind
        self.ident = ident


class WorkflowNotFound(NotFound):
    def __init__(self, workflow_id: str) -> None:
        super().__init__("workflow", workflow_id)


class JobNotFound(NotFound):
    def __init__(self, job_id: str) -> None:
        super().__init__("job", job_id)


class DeviceNotFound(NotFound):
    def __init__(self, device_id: str) -> None:
        super().__init__("device", device_id)


class WebhookNotFound(NotFound):
    def __init__(self, webhook_id: str) -> None:
        super().__init__("webhook", webhook_id)


class InvalidRequest(OtaBridgeError):
    """The request is well-formed JSON but asks for something that cannot be done."""

    status = 400
    title = "Invalid request"


class EmptyTarget(InvalidRequest):
    def __init__(self, field: str, value: str) -> None:
        super().__init__(f"{field} {value!r} matches no registered device")
        self.field = field
        self.value = value


class Conflict(OtaBridgeError):
    status = 409
    title = "Conflict"


class NoRollout(Conflict):
    """Pause or resume of a job that has no Rollout, Schedule, AbortOn or Continuous."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} has no rollout to pause or resume (it has no Rollout, Schedule, "
                         f"AbortOn or Continuous)")
        self.job_id = job_id


class DevicesExist(Conflict):
    """One or more devices of a registration are registered already; none of the request was."""

    def __init__(self, device_ids: list[str]) -> None:
        if len(device_ids) == 1:
            super().__init__(f"device {device_ids[0]!r} is already registered")
        else:
            super().__init__(f"{len(device_ids)} devices are already registered: "
                             f"{', '.join(repr(d) for d in device_ids)}; none was registered")
        self.device_ids = device_ids


class Unauthorized(OtaBridgeError):
    status = 401
    title = "Unauthorized"


class Forbidden(OtaBridgeError):
    """A valid token whose role may not call this operation."""

    status = 403
    title = "Forbidden"

    def __init__(self, token_name: str, role: str, operation: str, allowed: list[str]) -> None:
        super().__init__(f"token {token_name!r} has role {role}; {operation} needs {' or '.join(allowed)}")
        self.token_name = token_name
        self.role = role


class StoreUnavailable(OtaBridgeError):
    """The database cannot be reached or is busy; trying again later may work."""

    status = 503
    title = "Database unavailable"
    retry_after = 2  # seconds, sent as Retry-After: the store reconnects on the next call


class ConfigError(OtaBridgeError):
    """A bad setting; the message names the flag and the environment variable."""

    title = "Configuration error"


class ArtifactNotFound(NotFound):
    def __init__(self, artifact_id: str) -> None:
        super().__init__("artifact", artifact_id)


class ArtifactInUse(Conflict):
    """An artifact that pending jobs still need: deleting it would leave their devices nothing to fetch."""

    def __init__(self, artifact_id: str, job_ids: list[str]) -> None:
        shown = ", ".join(job_ids[:10]) + (f" and {len(job_ids) - 10} more" if len(job_ids) > 10 else "")
        super().__init__(f"artifact {artifact_id!r} is needed by pending jobs: {shown}; cancel or delete them "
                         f"first, or wait until they end")
        self.job_ids = job_ids


class ArtifactTooLarge(OtaBridgeError):
    status = 413
    title = "Artifact too large"

    def __init__(self, limit: int) -> None:
        unit, scale = next(((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if limit >= s),
                           ("bytes", 1))
        super().__init__(f"the artifact is over the limit of {limit} bytes ({limit / scale:.4g} {unit}) set by "
                         f"--max-artifact-size / OTA_BRIDGE_MAX_ARTIFACT_SIZE; nothing was stored")
        self.limit = limit


class ArtifactNotWritten(OtaBridgeError):
    """The artifact directory refused the upload's bytes: full, read-only, gone."""

    status = 507
    title = "Insufficient storage"

    def __init__(self, directory: str, reason: str) -> None:
        super().__init__(f"could not write the upload to the artifact directory {directory}: {reason}; "
                         f"nothing was stored")


class DownloadRefused(OtaBridgeError):
    """A device download whose link does not verify, or names a job that does not need the file."""

    status = 403
    title = "Forbidden"
