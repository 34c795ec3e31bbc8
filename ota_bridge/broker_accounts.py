"""Who may connect to the broker, kept in step with the device registry.

Embedded broker: it asks the database at every login and re-checks live sessions every few
seconds; a change drops the device's connection and session at once (disabled, rotated or
deleted). Mosquitto: the service writes a password file and an ACL file from the registry
into the accounts directory, one rewrite at a time and keeping the files' owner, group and
mode, and sends Mosquitto SIGHUP (its pid from `mosquitto.pid` there, once that pid is checked
to be Mosquitto's) to reload them. Dynamic security plugin: the service sends each change as it is
committed; in cluster mode any instance may, so each change is applied so that the broker ends as
the registry is, whichever instance's command the plugin applies last.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
from pathlib import Path
from typing import Iterator, Sequence

from agent.protocol import OPERATOR_USERNAME, SERVICE_CLIENT_ID, Topics

from . import credentials
from .embedded_broker import EmbeddedBroker
from .errors import OtaBridgeError
from .files import write_atomically
from .mosquitto_dynsec import (
    ADMIN_USERNAME,
    DEVICES_PER_MESSAGE,
    Account,
    DynsecClient,
    DynsecError,
    InstanceLogins,
    create_commands,
    delete_commands,
    initial_config,
    instance_commands,
)
from .store import Store, chunks, devices
from .store.account_locks import AccountLocks

log = logging.getLogger(__name__)

CONVERGE_ROUNDS = 5  # an enable or disable sends what the registry says again, at most this often
SLOW_SECONDS = 1.0  # failpoint slow-broker-accounts: between a committed change and the broker hearing of it

SERVICE_PASSWORD_FILE = "mqtt-service-password"  # in the data dir: the service's own broker password
OPERATOR_PASSWORD_FILE = "mqtt-operator-password"  # in the data dir: user "api", read-only watchers
DYNSEC_ADMIN_PASSWORD_FILE = "mqtt-dynsec-admin-password"  # in the data dir: the service as dynsec's admin
PASSWORDS, ACL, PID = "passwords", "acl", "mosquitto.pid"  # in the accounts dir
MOSQUITTO_PROCESS_NAME = "mosquitto"  # /proc/<pid>/comm of the broker the pid file names
FILE_MODE = 0o640  # for new files; a rewrite keeps the mode (owner, group) the file has


class AccountsNotWritten(OtaBridgeError):
    """Mosquitto's password or ACL file could not be written (the old ones are still in place), or its
    dynamic security plugin refused a change or did not answer."""

    title = "Broker accounts not written"


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
    """Mosquitto password file: one `user:$7$...` line each (the devices' stored hashes as they are).

    An id with ':' (registered before such ids were refused) cannot be a Mosquitto username: it is
    left out, with a warning, so that device cannot log in on Mosquitto.
    """
    lines = [f"{SERVICE_CLIENT_ID}:{credentials.hash_password(service_secret)}",
             f"{OPERATOR_USERNAME}:{credentials.hash_password(operator_secret)}"]
    for device_id, password_hash in accounts:
        if ":" in device_id:
            log.warning("device %r cannot log in on Mosquitto (':' in its id ends the username in the password "
                        "file); register it again under an id without ':'", device_id)
            continue
        lines.append(f"{device_id}:{password_hash}")
    return "\n".join(lines) + "\n"


def write_mosquitto_files(accounts: list[tuple[str, str]], out: Path, data_dir: Path, topics: Topics) -> None:
    """Write the password and ACL files atomically for these (device id, hash) accounts.

    New files get mode 0640 (and the directory's group when it is setgid); existing ones keep
    their owner, group and mode. Raises AccountsNotWritten if a file cannot be written.
    """
    passwords = password_text(accounts, broker_secret(data_dir, SERVICE_PASSWORD_FILE),
                              broker_secret(data_dir, OPERATOR_PASSWORD_FILE))
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / PASSWORDS, passwords.encode(), FILE_MODE, keep_attributes=True)
        write_atomically(out / ACL, acl_text(topics).encode(), FILE_MODE, keep_attributes=True)
    except OSError as e:
        raise AccountsNotWritten(f"could not write Mosquitto's accounts in {out}: {e}") from e


def write_dynsec_config(out: Path, accounts: list[tuple[str, str, bool]], data_dir: Path, topics: Topics) -> None:
    """The dynamic security plugin's first file: the admin (the service), the service, the operator and
    these (device id, hash, enabled) accounts; mode 0600 (Mosquitto's user must own it: it rewrites it)."""
    hashes = {user: credentials.hash_password(broker_secret(data_dir, name)) for user, name in
              ((ADMIN_USERNAME, DYNSEC_ADMIN_PASSWORD_FILE), (SERVICE_CLIENT_ID, SERVICE_PASSWORD_FILE),
               (OPERATOR_USERNAME, OPERATOR_PASSWORD_FILE))}
    try:
        write_atomically(out, initial_config(topics, hashes, accounts).encode(), 0o600, keep_attributes=True)
    except OSError as e:
        raise AccountsNotWritten(f"could not write {out}: {e}") from e


def instance_password_files(instance_id: str) -> InstanceLogins:
    """Cluster mode: the files, in the instance's data dir, of its own logins' passwords (named per
    instance, so that instances may share one data dir); `ota-bridge mosquitto-dynsec-instance` makes them."""
    return InstanceLogins(f"mqtt-service-password-{instance_id}", f"mqtt-dynsec-admin-password-{instance_id}")


async def set_up_instance(admin: DynsecClient, topics: Topics, data_dir: Path, instance_id: str) -> InstanceLogins:
    """Give a cluster instance its own service and admin logins on the plugin, their passwords kept in
    (or, set up before, read from) its data dir; safe to run again. Returns the usernames.

    New passwords are written only once the plugin took them: after a failed set-up the instance
    still has none, and says which command makes them, rather than failing to log in."""
    logins, files = InstanceLogins.of(instance_id), instance_password_files(instance_id)
    paths = [data_dir / files.service, data_dir / files.admin]
    secrets = [path.read_text().strip() if path.exists() else credentials.new_secret() for path in paths]
    try:
        await admin.run(instance_commands(topics, logins, InstanceLogins(*secrets)), exists_ok=True)
    except DynsecError as e:
        raise AccountsNotWritten(e.detail) from e
    for path, secret in zip(paths, secrets, strict=True):
        if not path.exists():
            write_atomically(path, (secret + "\n").encode(), 0o600)
    return logins


def reload_mosquitto(pid_file: Path) -> bool:
    """Send SIGHUP to the Mosquitto named by pid_file; False (and a warning) if there is none.

    A pid file left by a Mosquitto that stopped may name a process that reused the pid: only a
    process named mosquitto is signalled, through a pidfd so the pid cannot change in between.
    """
    try:
        pid = int(pid_file.read_text().strip())
        with _pidfd(pid) as fd:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            if name != MOSQUITTO_PROCESS_NAME:
                log.warning("did not tell Mosquitto to reload its accounts: pid %d (from %s) is %r, not Mosquitto, "
                            "so the file is stale; the accounts take effect when Mosquitto starts", pid, pid_file,
                            name)
                return False
            _send_sighup(pid, fd)
        return True
    except (OSError, ValueError) as e:
        log.warning("wrote Mosquitto's accounts but could not tell it to reload (%s: %s)", pid_file, e)
        return False


@contextlib.contextmanager
def _pidfd(pid: int) -> Iterator[int | None]:
    """A pidfd for pid (None where the kernel has none): it always refers to the same process."""
    try:
        fd: int | None = os.pidfd_open(pid)
    except AttributeError:  # not Linux
        fd = None
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
        fd = None
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _send_sighup(pid: int, fd: int | None) -> None:
    if fd is None:
        os.kill(pid, signal.SIGHUP)
    else:
        signal.pidfd_send_signal(fd, signal.SIGHUP)


class BrokerAccounts:
    """What the API calls when a device's right to connect changes."""

    def __init__(self, db: Store, topics: Topics, data_dir: Path, *,
                 embedded: EmbeddedBroker | None = None, mosquitto_dir: Path | None = None,
                 dynsec: DynsecClient | None = None, locks: AccountLocks | None = None, slow: bool = False) -> None:
        self.db, self.topics, self.data_dir = db, topics, data_dir
        self.embedded, self.mosquitto_dir, self.dynsec = embedded, mosquitto_dir, dynsec
        self.locks = locks  # cluster mode: a device's new password goes to the plugin under its lock
        self.delay = SLOW_SECONDS if slow else 0.0  # for tests: another instance's change may overtake this one
        self._rewrite_lock = asyncio.Lock()  # one rewrite at a time
        self._changes = self._written = 0  # changes counted; how many of them the files show

    async def start(self) -> None:
        if self.mosquitto_dir is not None:
            await self._rewrite_mosquitto()

    async def registered(self, accounts: Sequence[tuple[str, str]]) -> None:
        """New devices, (id, password) each: their accounts are made at once, or their registration is
        undone and this raises."""
        try:
            await self._apply()
            if self.dynsec is not None:
                for chunk in chunks(list(accounts), DEVICES_PER_MESSAGE):
                    await self._dynsec([c for a in chunk for c in create_commands(self.topics, Account(*a))])
        except AccountsNotWritten as e:
            await self._undo([device_id for device_id, _ in accounts], e)

    async def _undo(self, ids: list[str], e: AccountsNotWritten) -> None:
        if self.dynsec is not None:  # those the plugin made before it refused one
            with contextlib.suppress(AccountsNotWritten):
                await self._dynsec([c for i in ids for c in delete_commands(i)], missing_ok=True)
        await self.db.call(devices.delete_devices, ids)
        named = f"device {ids[0]!r} was" if len(ids) == 1 else f"{len(ids)} devices were"
        raise AccountsNotWritten(f"{e.detail}; {named} not registered") from e

    async def enabled(self, device_id: str, enabled: bool) -> None:
        """The device may (no longer) connect; disabled, it is dropped at once.

        Another instance may change the same device at the same time, and the plugin may apply the
        two commands in either order: once the plugin has answered, the registry is read again and,
        if it says otherwise, what it says is sent. The instance whose command the plugin applied
        last reads the registry after every commit that came before, so the broker ends as the registry.
        """
        await self._apply(None if enabled else device_id)
        await asyncio.sleep(self.delay)
        for _ in range(CONVERGE_ROUNDS):
            command = {"command": "enableClient" if enabled else "disableClient", "username": device_id}
            if not await self._device_change([command], device_id):
                return
            now = await self.db.call(devices.device_enabled, device_id)
            if now is None or now == enabled:
                return
            enabled = now

    async def rotated(self, device_id: str, password: str, password_hash: str) -> None:
        """The device has a new password (stored as password_hash); the old one stops working and its
        connection is dropped.

        In cluster mode two instances may re-key one device at once, and the plugin could apply the
        older password last. So each sends its password under the device's lock, and only if the
        registry still holds its hash: a newer one was committed before its own sender took the lock.
        """
        await self._apply(device_id)
        command = {"command": "setClientPassword", "username": device_id, "password": password}
        await asyncio.sleep(self.delay)
        if self.locks is None or self.dynsec is None:
            await self._device_change([command], device_id)
            return
        async with self.locks.holding(device_id):
            if await self.db.call(devices.password_hash, device_id) == password_hash:
                await self._device_change([command], device_id)

    async def _device_change(self, commands: list[dict[str, object]], device_id: str) -> bool:
        """Send a change of a registered device; False if the plugin no longer has it because it was
        deleted meanwhile (by another request, maybe on another instance: nothing left to change)."""
        try:
            await self._dynsec(commands)
        except AccountsNotWritten:
            if await self.db.call(devices.device_exists, device_id):
                raise
            return False
        return self.dynsec is not None

    async def deleted(self, device_id: str) -> None:
        await self._apply(device_id)
        await self._dynsec(delete_commands(device_id), missing_ok=True)

    async def _dynsec(self, commands: list[dict[str, object]], *, missing_ok: bool = False) -> None:
        if self.dynsec is None:
            return
        try:
            await self.dynsec.run(commands, missing_ok=missing_ok)
        except DynsecError as e:
            raise AccountsNotWritten(e.detail) from e

    async def _apply(self, drop: str | None = None) -> None:
        """Files and the embedded broker in step with the registry (the change is committed); drop that device."""
        if self.mosquitto_dir is not None:
            await self._rewrite_mosquitto()
        if drop is not None and self.embedded is not None and await self.embedded.disconnect_client(drop):
            log.info("disconnected device %s from the embedded broker", drop)

    async def _rewrite_mosquitto(self) -> None:
        """Rewrite the files from the registry and reload Mosquitto, unless a rewrite that began
        after this change was committed has done so already (a burst of changes needs few)."""
        assert self.mosquitto_dir is not None
        self._changes += 1
        change = self._changes
        async with self._rewrite_lock:
            if self._written >= change:
                return
            covered = self._changes  # every change counted so far is committed: the read below sees it
            accounts = await self.db.call(devices.broker_accounts)
            await asyncio.to_thread(write_mosquitto_files, accounts, self.mosquitto_dir, self.data_dir, self.topics)
            self._written = covered
            await asyncio.to_thread(reload_mosquitto, self.mosquitto_dir / PID)
