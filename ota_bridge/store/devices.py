"""Devices: registration, tags, whether they may connect, their MQTT passwords and presence."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable

import peewee as pw

from agent.protocol import JobStatus

from .. import credentials
from ..errors import DeviceExists, DeviceNotFound
from ..models import ChildJob, Device, DeviceTag
from . import PENDING, arg, chunks, finalize, idempotent, prepared, write_transaction


@dataclass(frozen=True)
class DeviceView:
    device: Device
    tags: tuple[str, ...]
    pending: int


def register_device(device_id: str, group: str | None, tags: Iterable[str]) -> tuple[DeviceView, str]:
    """Register a device; returns it and its MQTT password, which is kept only as a hash."""
    password = credentials.new_secret()
    with write_transaction():
        if device_exists(device_id):
            raise DeviceExists(device_id)
        Device.create(device_id=device_id, group=group, password_hash=credentials.hash_password(password))
        _set_tags(device_id, tags)
    return get_device(device_id), password


def _set_tags(device_id: str, tags: Iterable[str]) -> None:
    DeviceTag.delete().where(DeviceTag.device == device_id).execute()
    rows = [{"device": device_id, "tag": tag} for tag in dict.fromkeys(tags)]
    if rows:
        DeviceTag.insert_many(rows).execute()


def get_device(device_id: str) -> DeviceView:
    device = Device.get_or_none(Device.device_id == device_id)
    if device is None:
        raise DeviceNotFound(device_id)
    return _device_views([device])[0]


def list_devices(group: str | None = None, tag: str | None = None) -> list[DeviceView]:
    query = Device.select().order_by(Device.device_id)
    if group is not None:
        query = query.where(Device.group == group)
    if tag is not None:
        query = query.where(Device.device_id.in_(DeviceTag.select(DeviceTag.device).where(DeviceTag.tag == tag)))
    return _device_views(list(query))


def _device_views(devices: list[Device]) -> list[DeviceView]:
    ids = [d.device_id for d in devices]
    tags: dict[str, list[str]] = {i: [] for i in ids}
    pending: Counter[str] = Counter()
    for chunk in chunks(ids):
        for row in DeviceTag.select().where(DeviceTag.device.in_(chunk)).order_by(DeviceTag.tag):
            tags[row.device_id].append(row.tag)
        counts = (ChildJob.select(ChildJob.device_id, pw.fn.COUNT(ChildJob.seq).alias("n"))
                  .where(ChildJob.device_id.in_(chunk), ChildJob.status.in_(PENDING))
                  .group_by(ChildJob.device_id).tuples())
        pending.update(dict(counts))
    return [DeviceView(d, tuple(tags[d.device_id]), pending[d.device_id]) for d in devices]


def update_device(device_id: str, group: Any, tags: Iterable[str] | None, enabled: bool | None,
                  unset: object) -> DeviceView:
    """Change a device's group (None clears it; `unset` leaves it), tags, and whether it may connect."""
    with write_transaction():
        get_device(device_id)
        if group is not unset:
            Device.update(group=group).where(Device.device_id == device_id).execute()
        if tags is not None:
            _set_tags(device_id, tags)
        if enabled is not None:
            Device.update(enabled=enabled).where(Device.device_id == device_id).execute()
    return get_device(device_id)


def rotate_device_password(device_id: str) -> str:
    """A new MQTT password for the device; the old one stops working at once."""
    password = credentials.new_secret()
    with write_transaction():
        if not Device.update(password_hash=credentials.hash_password(password)).where(
                Device.device_id == device_id).execute():
            raise DeviceNotFound(device_id)
    return password


def broker_accounts() -> list[tuple[str, str]]:
    """(device id, password hash) of every enabled device, for a broker's password file."""
    query = Device.select(Device.device_id, Device.password_hash).where(Device.enabled == True)  # noqa: E712
    return list(query.order_by(Device.device_id).tuples())


def delete_device(device_id: str) -> None:
    """Forget a device; its jobs still queued are canceled, its finished history stays."""
    with write_transaction():
        if not Device.delete().where(Device.device_id == device_id).execute():
            raise DeviceNotFound(device_id)
        finalize(JobStatus.CANCELED, "the device was deleted",
                  ChildJob.device_id == device_id, ChildJob.status.in_(PENDING))


def device_exists(device_id: str) -> bool:
    return Device.select().where(Device.device_id == device_id).exists()


def check_device_password(device_id: str, password: str) -> bool:
    device = Device.get_or_none(Device.device_id == device_id)
    return bool(device and device.enabled and credentials.verify_password(password, device.password_hash))


def set_presence(updates: list[tuple[str, bool, datetime | None]]) -> None:
    """Record (device_id, online, seen at) per device; a None time keeps LastSeen as it was."""
    for device_id, online, seen in updates:
        if seen is None:
            prepared("presence", lambda _: Device.update({Device.online: arg(0)}).where(Device.device_id == arg(1)),
                     online, device_id)
        else:
            prepared("presence_seen", lambda _: Device.update({Device.online: arg(0), Device.last_seen: arg(1)})
                     .where(Device.device_id == arg(2)), online, seen, device_id)


@idempotent
def forget_presence() -> int:
    """Every device offline until it says otherwise: after a (re)connect to the broker, no presence
    heard before stands (an embedded broker that restarted keeps no retained presence, and no last
    will of a device that was connected to it). Returns how many were online."""
    return Device.update(online=False).where(Device.online == True).execute()  # noqa: E712


def all_device_ids() -> list[str]:
    return [d for (d,) in Device.select(Device.device_id).order_by(Device.device_id).tuples()]
