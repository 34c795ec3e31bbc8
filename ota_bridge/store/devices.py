"""Devices: registration, tags, whether they may connect, their MQTT passwords and presence."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Collection, Iterable, Sequence

import peewee as pw

from agent.protocol import JobStatus

from .. import credentials
from ..errors import DeviceNotFound, DevicesExist
from ..models import ChildJob, CredentialChange, Device, DeviceTag, db, now
from . import PENDING, arg, chunks, finalize, idempotent, prepared, write_transaction


@dataclass(frozen=True)
class DeviceView:
    device: Device
    tags: tuple[str, ...]
    pending: int


@dataclass(frozen=True)
class NewDevice:
    """A device to register, its password already hashed (CPU work done before the transaction)."""

    device_id: str
    group: str | None
    tags: tuple[str, ...]
    password_hash: str


def new_credentials(count: int) -> list[tuple[str, str]]:
    """(password, its hash) pairs: PBKDF2, CPU-bound; hashlib releases the GIL, so threads run it in parallel."""
    passwords = [credentials.new_secret() for _ in range(count)]
    return [(p, credentials.hash_password(p)) for p in passwords]


def register_device(device_id: str, group: str | None, tags: Iterable[str]) -> tuple[DeviceView, str]:
    """Register a device; returns it and its MQTT password, which is kept only as a hash."""
    [(password, password_hash)] = new_credentials(1)
    [view] = register_devices([NewDevice(device_id, group, tuple(tags), password_hash)])
    return view, password


def register_devices(new: Sequence[NewDevice]) -> list[DeviceView]:
    """Register every device or none, in one transaction: DevicesExist names each id already taken."""
    rows = [{"device_id": d.device_id, "group": d.group, "password_hash": d.password_hash, "created": now()}
            for d in new]
    try:
        with write_transaction():
            taken = existing_device_ids([d.device_id for d in new])
            if taken:
                raise DevicesExist(taken)
            for chunk in chunks(rows):
                Device.insert_many(chunk).execute()
            tag_rows = [{"device": d.device_id, "tag": t} for d in new for t in dict.fromkeys(d.tags)]
            for chunk in chunks(tag_rows):
                DeviceTag.insert_many(chunk).execute()
    except pw.IntegrityError as e:  # another writer (another instance) took an id between check and insert
        raise DevicesExist(existing_device_ids([d.device_id for d in new]) or ["(one of them)"]) from e
    return [DeviceView(Device(**row), tuple(dict.fromkeys(d.tags)), 0) for row, d in zip(rows, new, strict=True)]


def existing_device_ids(device_ids: list[str]) -> list[str]:
    """Those of device_ids that are registered, in the order given."""
    found: set[str] = set()
    for chunk in chunks(device_ids):
        found.update(d for (d,) in Device.select(Device.device_id).where(Device.device_id.in_(chunk)).tuples())
    return [d for d in device_ids if d in found]


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
        if enabled is False:
            note_credential_changes([device_id])
    return get_device(device_id)


def set_password_hash(device_id: str, password_hash: str) -> None:
    """Replace the device's password (hashed before the call, off the store's thread)."""
    with write_transaction():
        if not Device.update(password_hash=password_hash).where(Device.device_id == device_id).execute():
            raise DeviceNotFound(device_id)
        note_credential_changes([device_id])


def broker_accounts() -> list[tuple[str, str]]:
    """(device id, password hash) of every enabled device, for a broker's password file."""
    query = Device.select(Device.device_id, Device.password_hash).where(Device.enabled == True)  # noqa: E712
    return list(query.order_by(Device.device_id).tuples())


def delete_device(device_id: str) -> None:
    """Forget a device; its jobs still queued are canceled, its finished history stays."""
    with write_transaction():
        if not Device.delete().where(Device.device_id == device_id).execute():
            raise DeviceNotFound(device_id)
        note_credential_changes([device_id])
        finalize(JobStatus.CANCELED, "the device was deleted",
                  ChildJob.device_id == device_id, ChildJob.status.in_(PENDING))


CREDENTIAL_CHANGES_KEPT = timedelta(hours=1)  # the re-check reads them every few seconds
CREDENTIALS_LOCK_KEY = 0x07A_C4ED  # PostgreSQL: held by the transaction that notes a change, until it ends


def note_credential_changes(device_ids: Sequence[str]) -> None:
    """Inside the write transaction that disabled, re-keyed or deleted these devices: a row each for
    the embedded broker's re-check (credential_changes).

    On PostgreSQL the rows are written under a transaction lock, so their ids rise in the order their
    transactions commit: a reader that saw id n will never see a row below n appear later (SQLite has
    one writer at a time anyway). The rows up to the newest one noted over CREDENTIAL_CHANGES_KEPT ago
    (by the clock of whoever notes: clocks step and differ) go, but never the newest, which SQLite
    would hand out again: always the oldest ones, so a reader that finds the row after the last it
    saw gone knows it may have missed some (credential_changes)."""
    if not isinstance(db.obj, pw.SqliteDatabase):
        db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (CREDENTIALS_LOCK_KEY,))
    for chunk in chunks([{"device_id": d} for d in device_ids]):
        CredentialChange.insert_many(chunk).execute()
    old = (CredentialChange.select(pw.fn.MAX(CredentialChange.id))
           .where(CredentialChange.at < now() - CREDENTIAL_CHANGES_KEPT).scalar())
    if old is not None:
        newest = CredentialChange.select(pw.fn.MAX(CredentialChange.id)).scalar()
        CredentialChange.delete().where(CredentialChange.id <= old, CredentialChange.id < newest).execute()


def last_credential_change() -> int:
    """The id of the newest credential change (0: none): where a reader starts."""
    return CredentialChange.select(pw.fn.MAX(CredentialChange.id)).scalar() or 0


def credential_changes(seen: int) -> list[tuple[int, str]]:
    """(id, device id) of the credential changes from id `seen` on, oldest first: the one a reader
    saw last too, while it is kept. When neither it nor the one after it is among them (a gap), older
    rows were pruned before the reader read them, or ids were skipped (PostgreSQL: a rolled-back
    change): the reader cannot tell which devices changed."""
    query = (CredentialChange.select(CredentialChange.id, CredentialChange.device_id)
             .where(CredentialChange.id >= seen).order_by(CredentialChange.id))
    return list(query.tuples())


def device_password_hashes(device_ids: Sequence[str]) -> dict[str, str]:
    """The password hash of each of these devices that is registered and enabled."""
    found: dict[str, str] = {}
    for chunk in chunks(list(device_ids)):
        found.update(Device.select(Device.device_id, Device.password_hash)
                     .where(Device.device_id.in_(chunk), Device.enabled == True).tuples())  # noqa: E712
    return found


def dynsec_accounts() -> list[tuple[str, str, bool]]:
    """(device id, password hash, enabled) of every device, for the dynamic security plugin's first file."""
    query = Device.select(Device.device_id, Device.password_hash, Device.enabled).order_by(Device.device_id)
    return list(query.tuples())


def delete_devices(device_ids: list[str]) -> None:
    """Forget these devices, all in one transaction (a registration the broker's accounts could not take)."""
    with write_transaction():
        for chunk in chunks(device_ids):
            Device.delete().where(Device.device_id.in_(chunk)).execute()
            finalize(JobStatus.CANCELED, "the device was deleted",
                     ChildJob.device_id.in_(chunk), ChildJob.status.in_(PENDING))
        note_credential_changes(device_ids)


def password_hash(device_id: str) -> str | None:
    """The device's stored password hash; None if it is not registered."""
    row = Device.select(Device.password_hash).where(Device.device_id == device_id).tuples().first()
    return None if row is None else str(row[0])


def device_enabled(device_id: str) -> bool | None:
    """Whether the device may connect; None if it is not registered."""
    row = Device.select(Device.enabled).where(Device.device_id == device_id).tuples().first()
    return None if row is None else bool(row[0])


def device_exists(device_id: str) -> bool:
    return Device.select().where(Device.device_id == device_id).exists()


def check_device_password(device_id: str, password: str) -> bool:
    return checked_password_hash(device_id, password) is not None


def checked_password_hash(device_id: str, password: str) -> str | None:
    """The device's stored password hash if it is enabled and password matches it; else None."""
    device = Device.get_or_none(Device.device_id == device_id)
    if device and device.enabled and credentials.verify_password(password, device.password_hash):
        return str(device.password_hash)
    return None


def set_presence(updates: list[tuple[str, bool, datetime | None]], reporting: Collection[str] = ()) -> list[str]:
    """Record (device_id, online, seen at) per device; a None time keeps LastSeen as it was.

    Returns the devices heard online, live, for the first time ever (no LastSeen yet), but for those
    `reporting` on a job (they have had a head): a device is given its first head then, not at
    registration (see Dispatcher._handle). A batch of job reports alone costs no query for it."""
    first = _never_seen([d for d, online, seen in updates if online and seen is not None and d not in reporting])
    for device_id, online, seen in updates:
        if seen is None:
            prepared("presence", lambda _: Device.update({Device.online: arg(0)}).where(Device.device_id == arg(1)),
                     online, device_id)
        else:
            prepared("presence_seen", lambda _: Device.update({Device.online: arg(0), Device.last_seen: arg(1)})
                     .where(Device.device_id == arg(2)), online, seen, device_id)
    return first


def _never_seen(device_ids: list[str]) -> list[str]:
    """Those of device_ids that have never been seen online (LastSeen is empty)."""
    return [d for chunk in chunks(device_ids)
            for (d,) in Device.select(Device.device_id).where(Device.device_id.in_(chunk),
                                                               Device.last_seen.is_null()).tuples()]


@idempotent
def forget_presence() -> int:
    """Every device offline until it says otherwise: after a (re)connect to the broker, no presence
    heard before stands (an embedded broker that restarted keeps no retained presence, and no last
    will of a device that was connected to it). Returns how many were online."""
    return Device.update(online=False).where(Device.online == True).execute()  # noqa: E712


def all_device_ids() -> list[str]:
    return [d for (d,) in Device.select(Device.device_id).order_by(Device.device_id).tuples()]
