"""Request bodies, validated at the boundary. Field names are PascalCase, as in the SocketXP API."""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any, Literal, Optional
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from agent.protocol import DEVICE_ID_PATTERN, MAX_COMMAND_CHARS, NEW_DEVICE_ID_PATTERN, RESERVED_DEVICE_IDS

from .. import parameters
from ..errors import InvalidRequest
from ..rollout_plan import ROLLOUT_FIELDS, Plan, PlanError, parse
from ..store.artifacts import MAX_ARTIFACTS_PER_WORKFLOW
from ..store.job_options import MAX_RETRIES, MAX_RETRY_DELAY_SECONDS, RETRYABLE, JobOptions, Retries
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


class RetriesIn(Strict):
    """Run a device's failed or timed-out attempt again, up to Max more times, DelaySeconds apart."""

    Max: Annotated[int, Field(ge=1, le=MAX_RETRIES, description="retries after the first attempt")]
    DelaySeconds: Annotated[int, Field(ge=0, le=MAX_RETRY_DELAY_SECONDS)] = 0
    On: list[Literal["FAILED", "TIMED_OUT"]] = Field(
        default_factory=lambda: list(RETRYABLE), min_length=1, max_length=len(RETRYABLE),
        description="the end states of an attempt that are retried")

    def policy(self) -> Retries:
        return Retries(self.Max, self.DelaySeconds, tuple(dict.fromkeys(self.On)))


class GrowthIn(Strict):
    Factor: float = Field(description="the rate is multiplied by this (1.01 to 100) ...")
    AfterSucceeded: int = Field(description="... each time this many more devices succeeded")


class RolloutIn(Strict):
    """Either MaxPerMinute (optionally with Growth) or Waves (docs/rollouts.md)."""

    MaxPerMinute: Optional[int] = Field(default=None, description="release at most this many devices a minute")
    Growth: Optional[GrowthIn] = None
    Waves: Optional[list[float]] = Field(default=None, description="increasing percentages of the target ending "
                                                                   "at 100, e.g. [1, 10, 50, 100]")
    WaveSuccessPercent: Optional[float] = Field(default=None, description="the next wave goes once this share of "
                                                                          "the released devices succeeded (100)")
    SoakSeconds: Optional[int] = Field(default=None, description="and this long after that (0)")


class AbortIn(Strict):
    Status: str = Field(description="FAILED, TIMED_OUT, REJECTED or ANY (any of the three)")
    ThresholdPercent: float = Field(description="abort when at least this share of the finished devices ...")
    MinFinished: Optional[int] = Field(default=None, description="... once at least this many finished (1)")


class WindowIn(Strict):
    Cron: str = Field(description="five-field cron expression of each window's start, e.g. '0 2 * * *'")
    DurationMinutes: int
    TimeZone: Optional[str] = Field(default=None, description="IANA time zone of the cron expression (UTC)")


class ScheduleIn(Strict):
    StartTime: Optional[str] = Field(default=None, description="ISO 8601: nothing is released before")
    EndTime: Optional[str] = Field(default=None, description="ISO 8601: nothing is released after")
    EndBehavior: Optional[str] = Field(default=None, description="LEAVE (held devices stay held) or CANCEL")
    MaintenanceWindows: Optional[list[WindowIn]] = Field(default=None, description="release only inside one")


class JobIn(Strict):
    Name: Optional[NameText] = None
    WorkflowId: Ident
    DeviceId: Optional[DeviceIdField] = None
    DeviceGroup: Optional[Label] = None
    TagId: Optional[Label] = None
    TimeoutSeconds: Optional[Timeout] = None
    Parameters: Annotated[Optional[dict[str, Any]], AfterValidator(parameters.check_values),
                          Field(description="values of the workflow's {{name}} placeholders, each "
                                            "substituted shell-quoted (docs/rollouts-attempts.md)")] = None
    Retries: Optional[RetriesIn] = None
    OnFailure: Optional[Ident] = Field(default=None, description="a workflow run on a device whose attempts "
                                                                 "all failed (a rollback), as its own child job")
    Rollout: Optional[RolloutIn] = None
    AbortOn: Optional[list[AbortIn]] = None
    Schedule: Optional[ScheduleIn] = None
    Continuous: Optional[bool] = Field(default=None, description="a group or tag job: devices that join later "
                                                                 "get their own child, until the job is canceled")

    @model_validator(mode="after")
    def one_target(self) -> "JobIn":
        given = [f for f in TARGET_FIELDS if getattr(self, f) is not None]
        if len(given) != 1:
            named = ", ".join(given) if given else "none"
            raise ValueError(f"give exactly one target of DeviceId, DeviceGroup or TagId (got {named})")
        return self

    @property
    def options(self) -> JobOptions:
        return JobOptions(self.Parameters, self.Retries.policy() if self.Retries else None, self.OnFailure)

    @property
    def target(self) -> tuple[str, str]:
        field = next(f for f in TARGET_FIELDS if getattr(self, f) is not None)
        return field, getattr(self, field)

    def plan(self) -> Plan | None:
        """The rollout plan of the job's Rollout, AbortOn, Schedule and Continuous; a 400 naming a bad field."""
        try:
            return parse(self.model_dump(include=set(ROLLOUT_FIELDS), exclude_none=True), self.target[0])
        except PlanError as e:
            raise InvalidRequest(str(e)) from e


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
