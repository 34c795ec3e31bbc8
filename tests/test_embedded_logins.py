"""The embedded broker's login re-check against the service's own logins (BrokerLogins) over a real
SQLite database: what each round asks about, what it drops, and what it leaves alone.

The broker's own re-check task is stopped: each test runs a round when it means to.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

from agent.protocol import OPERATOR_USERNAME
from ota_bridge import credentials, service
from ota_bridge.embedded_broker import Login
from ota_bridge.errors import StoreUnavailable
from ota_bridge.models import CredentialChange, Device
from ota_bridge.roles import Role
from ota_bridge.service import BrokerLogins
from ota_bridge.store import Store, devices, tokens, write_transaction
from tests.support.databases import database_url
from tests.support.processes import REPO, Service, wait_until
from tests.support.raw_mqtt import RawClient
from tests.test_broker_hardening import BrokerThread

FLEET = 4


class AskedLogins(BrokerLogins):
    """BrokerLogins, noting the client ids each re-check asks about; with `gate` set, a re-check
    waits there once it has its verdicts, before the broker acts on them."""

    def __init__(self, db: Store) -> None:
        super().__init__(db)
        self.asked: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.waiting = threading.Event()  # a re-check waits at the gate
        self.fail_once = False  # the next still_valid fails, as when the database is away

    async def still_valid(self, logins: Sequence[Login]) -> list[bool]:
        self.asked.append(sorted(login.client_id for login in logins))
        if self.fail_once:
            self.fail_once = False
            raise StoreUnavailable("the database is away")
        verdicts = await super().still_valid(logins)
        if self.gate is not None:
            self.waiting.set()
            await self.gate.wait()
        return verdicts


class Fleet:
    def __init__(self, tmp_path: Path, url: str | None = None) -> None:
        self.url = url or f"sqlite:///{tmp_path / 'logins.db'}"
        self.db = Store(self.url)
        self.passwords = {f"d{i}": self.db.call_sync(devices.register_device, f"d{i}", None, [])[1]
                          for i in range(FLEET)}
        self.logins = AskedLogins(self.db)
        self.running = BrokerThread(logins=self.logins)
        recheck = self.running.broker._recheck
        assert recheck is not None
        self.running.loop.call_soon_threadsafe(recheck.cancel)
        self.opened: list[RawClient] = []

    def device(self, device_id: str, password: str | None = None, **kwargs: Any) -> RawClient:
        client = self.running.login(device_id, device_id, password or self.passwords[device_id], **kwargs)
        self.opened.append(client)
        return client

    def recheck(self) -> int:
        return self.running.call(self.running.broker.recheck())

    def rotate(self, device_id: str) -> str:
        """A new password for the device, as the API's re-key stores it."""
        password = credentials.new_secret()
        self.db.call_sync(devices.set_password_hash, device_id, credentials.hash_password(password))
        return password

    def close(self) -> None:
        for client in self.opened:
            client.close()
        self.running.close()
        self.db.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with contextlib.closing(Fleet(tmp_path)) as running:
        yield running


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fleet_on(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    """A fleet on a SQLite file, then on a fresh PostgreSQL database."""
    with database_url(request.param, tmp_path) as url, contextlib.closing(Fleet(tmp_path, url)) as running:
        yield running


def test_a_round_asks_only_about_the_logins_that_came_or_changed_since_the_last(fleet: Fleet) -> None:
    clients = {d: fleet.device(d) for d in fleet.passwords}
    assert fleet.recheck() == 0
    assert fleet.logins.asked == [sorted(fleet.passwords)]  # the first round: every login
    assert fleet.recheck() == 0
    assert len(fleet.logins.asked) == 1  # nothing came, nothing changed: no login read, none hashed

    fleet.rotate("d1")
    fleet.db.call_sync(devices.update_device, "d2", None, None, False, None)  # disabled
    fleet.db.call_sync(devices.delete_device, "d3")
    assert fleet.recheck() == 3
    assert fleet.logins.asked[-1] == ["d1", "d2", "d3"]
    assert [d for d, client in clients.items() if client.closed_by_broker(timeout=5)] == ["d1", "d2", "d3"]
    assert clients["d0"].alive()

    fleet.db.call_sync(devices.update_device, "d2", None, None, True, None)  # enabled again, it logs in:
    back = fleet.device("d2")  # the next round asks about it alone
    assert fleet.recheck() == 0
    assert fleet.logins.asked[-1] == ["d2"]
    assert back.alive()


def test_a_login_that_came_after_a_round_read_the_changes_is_checked_in_the_next(fleet: Fleet) -> None:
    assert fleet.recheck() == 0  # the changes read up to now
    client = fleet.device("d0")
    # A change the store notes only after the front checked d0 but before amqtt stored its session
    # would be read by a round that does not hold d0 yet: d0 is asked about all the same, next round.
    fleet.db.call_sync(lambda: Device.update(enabled=False).where(Device.device_id == "d0").execute())
    assert fleet.recheck() == 1
    assert client.closed_by_broker(timeout=5)


def test_a_new_device_login_hashes_its_password_once(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    verified: list[str] = []

    def counted(password: str, stored: str) -> bool:
        verified.append(password)
        return real(password, stored)

    real = credentials.verify_password
    monkeypatch.setattr(credentials, "verify_password", counted)
    assert fleet.recheck() == 0
    fleet.device("d0")
    stranger = fleet.running.client()
    fleet.opened.append(stranger)
    assert stranger.connect("d1", "d1", fleet.passwords["d0"]) == 5  # as strict as ever
    assert fleet.recheck() == 0
    assert fleet.logins.asked[-1] == ["d0"]
    assert verified == [fleet.passwords["d0"], fleet.passwords["d0"]]  # d0's login, d1's refusal: none at the re-check
    password = fleet.rotate("d0")
    assert fleet.recheck() == 1  # the rotated hash is checked again, the cache notwithstanding
    assert verified[2:] == [fleet.passwords["d0"]]
    fleet.device("d0", password)
    assert fleet.recheck() == 0
    assert verified[3:] == [password]


def test_a_device_that_logs_in_again_with_new_credentials_during_a_round_is_not_dropped(fleet: Fleet) -> None:
    assert fleet.recheck() == 0
    old = fleet.device("d0", clean=False)
    assert fleet.recheck() == 0
    password = fleet.rotate("d0")
    fleet.logins.gate = gate = asyncio.Event()
    round_ = asyncio.run_coroutine_threadsafe(fleet.running.broker.recheck(), fleet.running.loop)
    assert fleet.logins.waiting.wait(10)  # the round holds its verdict: d0's old password fails
    new = fleet.device("d0", password, clean=False)  # its persistent session, the new password merged in
    assert old.closed_by_broker(timeout=5)  # taken over
    fleet.running.loop.call_soon_threadsafe(gate.set)
    assert round_.result(10) == 0  # the session no longer holds the credentials the round judged
    fleet.logins.gate = None
    assert fleet.recheck() == 0  # the next round checks the new ones
    assert fleet.logins.asked[-1] == ["d0"]
    assert new.alive()


def test_an_operators_session_is_asked_about_every_round(fleet: Fleet) -> None:
    token = fleet.db.call_sync(tokens.create_token, "watcher", Role.VIEWER)
    watcher = fleet.running.login("d9", OPERATOR_USERNAME, token)  # no device d9 yet
    fleet.opened.append(watcher)
    other = fleet.running.login("watcher-2", OPERATOR_USERNAME, token)
    fleet.opened.append(other)
    assert fleet.recheck() == 0
    assert fleet.recheck() == 0
    assert fleet.logins.asked[-1] == ["d9", "watcher-2"]
    fleet.db.call_sync(devices.register_device, "d9", None, [])  # its id is now a device's
    assert fleet.recheck() == 1
    assert watcher.closed_by_broker(timeout=5)
    fleet.db.call_sync(tokens.revoke_token, "watcher")
    assert fleet.recheck() == 1
    assert other.closed_by_broker(timeout=5)


def test_a_failed_round_leaves_every_login_to_the_next(fleet: Fleet) -> None:
    clients = {d: fleet.device(d) for d in fleet.passwords}
    assert fleet.recheck() == 0
    fleet.db.call_sync(devices.update_device, "d1", None, None, False, None)  # disabled
    fleet.logins.fail_once = True
    with pytest.raises(StoreUnavailable):
        fleet.recheck()  # it read d1's change, then failed before it dropped anything
    assert fleet.recheck() == 1  # d1's change is behind it: the next round asks about every login
    assert fleet.logins.asked[-1] == sorted(fleet.passwords)
    assert clients["d1"].closed_by_broker(timeout=5)
    assert clients["d0"].alive()


def test_a_rekeyed_device_logging_in_with_its_old_password_during_the_round_is_refused_and_dropped(
        fleet: Fleet) -> None:
    old = fleet.device("d0", clean=False)
    assert fleet.recheck() == 0
    fleet.rotate("d0")
    fleet.logins.gate = gate = asyncio.Event()
    round_ = asyncio.run_coroutine_threadsafe(fleet.running.broker.recheck(), fleet.running.loop)
    assert fleet.logins.waiting.wait(10)  # the round holds its verdict on the old password
    again = fleet.running.client()
    fleet.opened.append(again)
    assert again.connect("d0", "d0", fleet.passwords["d0"], clean=False) == 5
    fleet.running.loop.call_soon_threadsafe(gate.set)
    assert round_.result(10) == 1  # the refused login left the session as the round judged it
    assert old.closed_by_broker(timeout=5)
    fleet.logins.gate = None
    assert fleet.recheck() == 0
    assert fleet.running.session_count() == 0


def test_changes_pruned_before_a_round_read_them_make_it_ask_about_every_login(
        fleet_on: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    clients = {d: fleet_on.device(d) for d in fleet_on.passwords}
    assert fleet_on.recheck() == 0
    fleet_on.db.call_sync(devices.update_device, "d1", None, None, False, None)  # disabled
    # The next change is noted by a clock more than the hour kept ahead (another process's, this
    # one's after a step forward, or the same clock with this round's loop stalled past the hour):
    # it prunes d1's change before any round read it.
    later = devices.now() + devices.CREDENTIAL_CHANGES_KEPT * 2
    monkeypatch.setattr(devices, "now", lambda: later)
    fleet_on.rotate("d2")
    monkeypatch.undo()
    assert [d for _, d in fleet_on.db.call_sync(devices.credential_changes, 0)] == ["d2"]
    assert fleet_on.recheck() == 2
    assert fleet_on.logins.asked[-1] == sorted(fleet_on.passwords)
    assert [d for d, client in clients.items() if client.closed_by_broker(timeout=5)] == ["d1", "d2"]


def test_a_change_noted_after_the_changes_were_emptied_is_not_missed(fleet_on: Fleet) -> None:
    fleet_on.rotate("d3")
    fleet_on.rotate("d3")
    clients = {d: fleet_on.device(d) for d in ("d0", "d1")}
    assert fleet_on.recheck() == 0  # every login; the changes read up to d3's second
    # The table emptied by hand: SQLite hands out ids again from below the last one read. (Once they
    # pass it again, such a change waits for the round that asks about every login, as any by hand.)
    fleet_on.db.call_sync(lambda: CredentialChange.delete().execute())
    fleet_on.db.call_sync(devices.update_device, "d1", None, None, False, None)  # disabled
    assert fleet_on.recheck() == 1
    assert clients["d1"].closed_by_broker(timeout=5)
    assert clients["d0"].alive()


class Writer:
    """tests/support/credential_writer.py: another process changing a device's credentials."""

    def __init__(self, url: str, device_id: str, what: str, hold: bool = False) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.credential_writer", url, device_id, what, *(["hold"] * hold)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def start(self) -> None:
        """Once the database is open, the change."""
        assert self.said() == "ready"
        self.go()

    def said(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def finish(self) -> None:
        said, _ = self.process.communicate(timeout=60)
        assert self.process.returncode == 0
        assert said.strip().endswith("done")

    def kill(self) -> None:
        """Whatever happened, the process gone and its pipes closed."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=10)


def waits_for_the_slow_one(url: str, fast: Writer) -> bool:
    """Whether the fast writer finished, or waits for a lock held by the slow one (PostgreSQL: on a
    lock; SQLite tells nobody, so a moment is given for its write to start waiting)."""
    if fast.process.poll() is not None:
        return True
    if url.startswith("sqlite"):
        time.sleep(1.0)
        return True
    import psycopg2  # noqa: PLC0415 (only with PostgreSQL)

    with contextlib.closing(psycopg2.connect(url)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND wait_event_type = 'Lock' AND wait_event = 'advisory'")
        return bool(cursor.fetchone()[0])


@pytest.mark.parametrize("what", ["disable", "rotate", "delete"])
def test_a_change_committed_after_a_later_one_was_read_is_not_missed(fleet_on: Fleet, what: str) -> None:
    clients = {d: fleet_on.device(d) for d in ("d1", "d2")}
    assert fleet_on.recheck() == 0  # every login, the changes read up to now
    slow, fast = Writer(fleet_on.url, "d1", what, hold=True), Writer(fleet_on.url, "d2", what)
    try:
        assert fast.said() == "ready"
        slow.start()
        assert slow.said() == "noted"  # d1's change is noted, its transaction still open
        fast.go()  # d2's is noted after it
        wait_until(lambda: waits_for_the_slow_one(fleet_on.url, fast), 30, "the second writer")
        dropped = fleet_on.recheck()  # a round while d1's change is not committed
        slow.go()
        slow.finish()
        fast.finish()
    finally:
        slow.kill()
        fast.kill()
    dropped += fleet_on.recheck()
    assert dropped == 2
    assert all(client.closed_by_broker(timeout=5) for client in clients.values())


def test_a_device_changed_by_hand_is_dropped_at_the_round_that_asks_about_every_login(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    clients = {d: fleet.device(d) for d in ("d0", "d1")}
    assert fleet.recheck() == 0
    fleet.db.call_sync(lambda: Device.update(enabled=False).where(Device.device_id == "d1").execute())
    assert fleet.recheck() == 0  # not noted: a round asks about none but what came or was noted
    monkeypatch.setattr(service, "RECHECK_ALL_SECONDS", 0.0)  # the 5 minutes are up
    assert fleet.recheck() == 1
    assert fleet.logins.asked[-1] == ["d0", "d1"]
    assert clients["d1"].closed_by_broker(timeout=5)


def test_a_token_revoked_by_the_cli_drops_its_operators_at_the_next_round(fleet_on: Fleet, tmp_path: Path) -> None:
    token = fleet_on.db.call_sync(tokens.create_token, "watcher", Role.VIEWER)
    watcher = fleet_on.running.login("watcher-1", OPERATOR_USERNAME, token)
    fleet_on.opened.append(watcher)
    assert fleet_on.recheck() == 0
    assert fleet_on.recheck() == 0
    revoked = subprocess.run(
        [sys.executable, "-m", "ota_bridge", "token", "revoke", "--name", "watcher", "--database", fleet_on.url,
         "--data-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0, revoked.stderr
    assert fleet_on.recheck() == 1
    assert watcher.closed_by_broker(timeout=5)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_service_drops_devices_another_process_changed_in_its_database(kind: str, tmp_path: Path) -> None:
    """The service's own re-check loop, its database changed by another process (not its API)."""
    with database_url(kind, tmp_path) as url:
        service = Service(tmp_path, database=url)
        service.start()
        clients: dict[str, RawClient] = {}
        try:
            passwords = {d: service.api.device(d) for d in ("d0", "d1", "d2", "d3")}
            for device_id, password in passwords.items():
                clients[device_id] = client = RawClient(service.mqtt_port)
                assert client.connect(device_id, device_id, password) == 0
            for device_id, what in (("d0", "disable"), ("d1", "rotate"), ("d2", "delete")):
                writer = Writer(url, device_id, what)
                try:
                    writer.start()
                    writer.finish()
                finally:
                    writer.kill()
            assert [d for d, client in clients.items() if client.closed_by_broker(timeout=15)] == ["d0", "d1", "d2"]
            assert clients["d3"].alive()
            refused = RawClient(service.mqtt_port)
            clients["again"] = refused
            assert refused.connect("d1", "d1", passwords["d1"]) == 5
        finally:
            for client in clients.values():
                client.close()
            service.stop()


def test_after_a_rolled_back_change_the_rounds_ask_about_what_changed_again(fleet_on: Fleet) -> None:
    clients = {d: fleet_on.device(d) for d in fleet_on.passwords}
    assert fleet_on.recheck() == 0

    def rolled_back() -> None:
        with contextlib.suppress(RuntimeError), write_transaction():
            devices.update_device("d0", None, None, False, None)
            raise RuntimeError("the rest of the transaction failed")

    fleet_on.db.call_sync(rolled_back)  # PostgreSQL: its id is skipped; SQLite hands it out again
    fleet_on.db.call_sync(devices.update_device, "d1", None, None, False, None)
    assert fleet_on.recheck() == 1  # on PostgreSQL the gap makes it ask about every login
    assert clients["d1"].closed_by_broker(timeout=5)
    asked = len(fleet_on.logins.asked)
    assert fleet_on.recheck() == 0
    assert len(fleet_on.logins.asked) == asked  # nothing since: nothing asked
    fleet_on.rotate("d2")
    assert fleet_on.recheck() == 1
    assert fleet_on.logins.asked[-1] == ["d2"]
    assert clients["d0"].alive() and clients["d3"].alive()


def test_a_deleted_or_rekeyed_device_leaves_the_rechecks_password_cache(fleet: Fleet) -> None:
    """The cache of checked passwords holds no entry for a device deleted or re-keyed since: a fleet
    whose devices come and go does not grow it for good."""
    for device_id in ("d0", "d1", "d2"):
        fleet.device(device_id)
    assert fleet.recheck() == 0
    assert {"d0", "d1", "d2"} <= set(fleet.logins._verified)
    fleet.db.call_sync(devices.delete_device, "d0")
    fleet.rotate("d1")
    assert fleet.recheck() == 2
    assert "d0" not in fleet.logins._verified and "d1" not in fleet.logins._verified
    assert "d2" in fleet.logins._verified  # unchanged: its re-check still needs no PBKDF2
