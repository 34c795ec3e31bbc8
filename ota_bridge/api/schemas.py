"""Request bodies, validated at the boundary. Field names are PascalCase, as in the SocketXP API."""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from agent.protocol import DEVICE_ID_PATTERN

from ..store import TARGET_FIELDS

MAX_TIMEOUT_SECONDS = 7 * 24 * 3600

NameText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200,
                                        pattern=r"^[^\x00-\x1f\x7f]*$")]
Label = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200,
                                         pattern=r"^[^\x00-\x1f\x7f/+#]*$")]
CommandText = Annotated[str, StringConstraints(min_length=1, max_length=65536, pattern=r"\S")]
DeviceIdField = Annotated[str, StringConstraints(pattern=f"^{DEVICE_ID_PATTERN}$")]
Ident = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Timeout = Annotated[int, Field(ge=1, le=MAX_TIMEOUT_SECONDS, strict=True)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkflowIn(Strict):
    Name: NameText
    Command: CommandText
    TimeoutSeconds: Optional[Timeout] = None
    SuccessOnRestart: bool = False


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
    DeviceId: DeviceIdField
    DeviceGroup: Optional[Label] = None
    Tags: list[Label] = Field(default_factory=list, max_length=100)


class DevicePatch(Strict):
    DeviceGroup: Optional[Label] = None
    Tags: Optional[list[Label]] = Field(default=None, max_length=100)
