"""Who may connect to the broker, kept in step with the device registry.

Embedded broker: it asks the database at every login and re-checks live sessions every few
seconds; a change drops the device's connection and session at once (disabled, rotated or
deleted). Mosquitto: the service writes a password file and an ACL file from the registry
into the accounts directory and sends Mosquitto SIGHUP (its pid from `mosquitto.pid` there) to
reload them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from agent.protocol import OPERATOR_USERNAME, SERVICE_CLIENT_ID, Topics

from . import credentials, store
from .embedded_broker import EmbeddedBroker
from .files import write_atomically

log = logging.getLogger(__name__)

SERVICE_PASSWORD_FILE = "mqtt-service-password"  # in the data dir: the service's own broker password
OPERATOR_PASSWORD_FILE = "mqtt-operator-password"  # in the data dir: user "api", read-only watchers
PASSWORDS, ACL, PID = "passwords", "acl", "mosquitto.pid"  # in the accounts dir


def broker_secret(data_dir: Path, name: str) -> str:
    """A secret kept in the data dir (mode 0600), made on first use."""
    path = data_dir / name
    if not path.exists():
        write_atomically(path, (credentials.new_secret() + "\n").encode(), 0o600)
    return path.read_text().strip()


def acl_text(topics: Topics) -> str:
    """Mosquitto ACL: the service reads and writes all, operators read all, a device its own."""
    prefix, own = topics.prefix, topics.device("%u", "")
    return "\n".join([
        "# Written by ota-bridge from its device registry; edits are overwritten.",
        f"user {SERVICE_CLIENT_ID}", f"topic readwrite {prefix}/#", "",
        f"user {OPERATOR_USERNAME}", f"topic read {prefix}/#", "",
        "# Every device (its username is its device id): its own topics only.",
        f"pattern read {own}{Topics.JOB}",
        f"pattern read {own}{Topics.QUEUE}",
        f"pattern write {own}{Topics.STATUS}",
        f"pattern readwrite {own}{Topics.PRESENCE}",
        "",
    ])


def password_text(accounts: list[tuple[str, str]], service_secret: str, operator_secret: str) -> str:
    """Mosquitto password file: one `user:$7$...` line each (the devices' stored hashes as they are)."""
    lines = [f"{SERVICE_CLIENT_ID}:{credentials.hash_password(service_secret)}",
             f"{OPERATOR_USERNAME}:{credentials.hash_password(operator_secret)}"]
    lines += [f"{device_id}:{password_hash}" for device_id, password_hash in accounts]
    return "\n".join(lines) + "\n"


def write_mosquitto_files(accounts: list[tuple[str, str]], out: Path, data_dir: Path, topics: Topics) -> None:
    """Write the password and ACL files atomically (mode 0640) for these (device id, hash) accounts."""
    out.mkdir(parents=True, exist_ok=True)
    passwords = password_text(accounts, broker_secret(data_dir, SERVICE_PASSWORD_FILE),
                              broker_secret(data_dir, OPERATOR_PASSWORD_FILE))
    write_atomically(out / PASSWORDS, passwords.encode(), 0o640)
    write_atomically(out / ACL, acl_text(topics).encode(), 0o640)


class BrokerAccounts:
    """What the API calls when a device's right to connect changes."""

    def __init__(self, db: store.Store, topics: Topics, data_dir: Path, *,
                 embedded: EmbeddedBroker | None = None, mosquitto_dir: Path | None = None) -> None:
        self.db, self.topics, self.data_dir = db, topics, data_dir
        self.embedded, self.mosquitto_dir = embedded, mosquitto_dir

    async def start(self) -> None:
        if self.mosquitto_dir is not None:
            await self._rewrite_mosquitto()

    async def changed(self, device_id: str, *, disconnect: bool) -> None:
        """The device was registered, disabled, enabled, rotated or deleted."""
        if self.mosquitto_dir is not None:
            await self._rewrite_mosquitto()
        if disconnect and self.embedded is not None and await self.embedded.disconnect_client(device_id):
            log.info("disconnected device %s from the embedded broker", device_id)

    async def _rewrite_mosquitto(self) -> None:
        assert self.mosquitto_dir is not None
        accounts = await self.db.call(store.broker_accounts)
        await asyncio.to_thread(write_mosquitto_files, accounts, self.mosquitto_dir, self.data_dir, self.topics)
        pid_file = self.mosquitto_dir / PID
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGHUP)
        except (OSError, ValueError) as e:
            log.warning("wrote Mosquitto's accounts but could not tell it to reload (%s: %s)", pid_file, e)
