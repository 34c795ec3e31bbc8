"""Request bodies, validated at the boundary. Field names are PascalCase, as in the SocketXP API."""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Optional
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from agent.protocol import DEVICE_ID_PATTERN, MAX_COMMAND_CHARS, NEW_DEVICE_ID_PATTERN, RESERVED_DEVICE_IDS

from ..store.artifacts import MAX_ARTIFACTS_PER_WORKFLOW
from ..store.jobs import TARGET_FIELDS

MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
MAX_BULK_DEVICES = 1000  # per POST /v1/devices: its answer (every password) stays well under a megabyte

NameText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200,
                                        pattern=r"^[^\x00-\x1f\x7f]*$")]
Label = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200,
                                         pattern=r"^[^\x00-\x1f\x7f/+#]*$")]
# A command may span lines; other control characters (NUL above all) have no place in one.
def _has_text(value: str) -> str:
    if not value.strip():
        raise ValueError("the command is blank")
    return value


CommandText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_COMMAND_CHARS,
                                               pattern=r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]+$"),
                        AfterValidator(_has_text)]


def _not_reserved(value: str) -> str:
    if value in RESERVED_DEVICE_IDS:
        raise ValueError(f"{value!r} is reserved for the service's own MQTT identities")
    return value


def _no_colon(value: str) -> str:
    if ":" in value:
        raise ValueError(f"{value!r} holds ':', which a new device id may not: Mosquitto's password file "
                         f"(user:hash) would end the username there, so the device could never log in")
    return value


DeviceIdField = Annotated[str, StringConstraints(pattern=f"^{DEVICE_ID_PATTERN}$"), AfterValidator(_not_reserved)]
# Registration: as above, minus ':' (the documented pattern says so; the check names the character).
NewDeviceIdField = Annotated[DeviceIdField, AfterValidator(_no_colon),
                             Field(json_schema_extra={"pattern": f"^{NEW_DEVICE_ID_PATTERN}$"})]
Ident = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Timeout = Annotated[int, Field(ge=1, le=MAX_TIMEOUT_SECONDS, strict=True)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # JSON types as sent: "yes" is no bool


class WorkflowIn(Strict):
    Name: NameText
    Command: CommandText
    TimeoutSeconds: Optional[Timeout] = None
    SuccessOnRestart: bool = False
    Artifacts: list[Ident] = Field(default_factory=list, max_length=MAX_ARTIFACTS_PER_WORKFLOW,
                                   description="ArtifactIds: the files each device fetches and checks before the "
                                               "command runs (docs/api.md#artifacts)")


class JobIn(Strict):
    Name: Optional[NameText] = None
    WorkflowId: Ident
    DeviceId: Optional[DeviceIdField] = None
    DeviceGroup: Optional[Label] = None
    TagId: Optional[Label] = None
    TimeoutSeconds: Optional[Timeout] = None

    @model_validator(mode="after")
    def one_target(self) -> "JobIn":
        given = [f for f in TARGET_FIELDS if getattr(self, f) is not None]
        if len(given) != 1:
            named = ", ".join(given) if given else "none"
            raise ValueError(f"give exactly one target of DeviceId, DeviceGroup or TagId (got {named})")
        return self

    @property
    def target(self) -> tuple[str, str]:
        field = next(f for f in TARGET_FIELDS if getattr(self, f) is not None)
        return field, getattr(self, field)


class DeviceIn(Strict):
    DeviceId: NewDeviceIdField
    DeviceGroup: Optional[Label] = None
    Tags: list[Label] = Field(default_factory=list, max_length=100)


class DevicePatch(Strict):
    DeviceGroup: Optional[Label] = None
    Tags: Optional[list[Label]] = Field(default=None, max_length=100)
    Enabled: Optional[bool] = None


class DevicesIn(Strict):
    """A bulk registration: every device or none."""

    Devices: list[DeviceIn] = Field(min_length=1, max_length=MAX_BULK_DEVICES)

    @model_validator(mode="after")
    def distinct_ids(self) -> "DevicesIn":
        counts = Counter(d.DeviceId for d in self.Devices)
        repeated = [repr(device_id) for device_id, n in counts.items() if n > 1]
        if repeated:
            raise ValueError(f"each DeviceId may appear once; repeated: {', '.join(repeated)}")
        return self


MAX_URL_CHARS = 2000


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host, like https://hooks.example.com/ota")
    try:
        parts.port  # noqa: B018 - a bad port raises
    except ValueError as e:
        raise ValueError(f"the URL's port is not valid: {e}") from e
    return value


WebhookUrl = Annotated[str, StringConstraints(min_length=1, max_length=MAX_URL_CHARS, pattern=r"^[!-~]+$"),
                       AfterValidator(_http_url)]


class WebhookIn(Strict):
    Url: WebhookUrl = Field(description="receives a signed POST when a job or child job ends "
                                        "(docs/operations.md#webhooks)")
