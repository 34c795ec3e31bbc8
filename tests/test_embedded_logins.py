"""The embedded broker's login re-check against the service's own logins (BrokerLogins) over a real
SQLite database: what each round asks about, what it drops, and what it leaves alone.

The broker's own re-check task is stopped: each test runs a round when it means to.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

from agent.protocol import OPERATOR_USERNAME
from ota_bridge import credentials
from ota_bridge.embedded_broker import Login
from ota_bridge.models import Device
from ota_bridge.roles import Role
from ota_bridge.service import BrokerLogins
from ota_bridge.store import Store, devices, tokens
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

    async def still_valid(self, logins: Sequence[Login]) -> list[bool]:
        self.asked.append(sorted(login.client_id for login in logins))
        verdicts = await super().still_valid(logins)
        if self.gate is not None:
            self.waiting.set()
            await self.gate.wait()
        return verdicts


class Fleet:
    def __init__(self, tmp_path: Path) -> None:
        self.db = Store(f"sqlite:///{tmp_path / 'logins.db'}")
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
