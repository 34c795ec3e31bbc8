"""What a CONNECT, a SUBSCRIBE and the login re-check cost the embedded broker, counted structurally:
how many sessions, filters and retained messages each visits with a fleet connected. Each used to
visit all of them (CPU quadratic in the fleet's size while it connects); now a client's own.

The broker's tables are swapped, before any client arrives, for subclasses of the same tables that
count every pass over them; amqtt's own once-a-second pass over the sessions (its session expiry
monitor, not what is measured here) is stopped.
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterator

import pytest

from agent.protocol import OPERATOR_USERNAME
from ota_bridge.embedded_broker.core import _Subscriptions
from tests.support.processes import wait_until
from tests.support.raw_mqtt import RawClient
from tests.test_broker_hardening import QUIET, SERVICE_ID, SERVICE_SECRET, SERVICE_USERNAME, TOKEN, TOPICS, BrokerThread

FLEET = 30  # devices connected, each with a subscription and a retained message of its own


class Counted:
    """Mixed into a broker table: counts the entries every pass over the whole table yields."""

    visited = 0

    def __iter__(self) -> Any:
        entries = list(super().__iter__())  # type: ignore[misc]
        type(self).visited += len(entries)
        return iter(entries)

    def keys(self) -> Any:
        return list(self.__iter__())

    def values(self) -> Any:
        return [dict.__getitem__(self, key) for key in self.__iter__()]  # type: ignore[arg-type]

    def items(self) -> Any:
        return [(key, dict.__getitem__(self, key)) for key in self.__iter__()]  # type: ignore[arg-type]


def counting(table: Any) -> Any:
    """An empty table of table's own class, counting passes over it."""
    return type(f"Counted{type(table).__name__}", (Counted, type(table)), {"visited": 0})()


class Fleet:
    def __init__(self) -> None:
        self.running = BrokerThread()
        self.opened: list[RawClient] = []
        amqtt = self.running.broker.core._broker
        self.sessions = amqtt._sessions = counting(amqtt._sessions)
        self.subscriptions = amqtt._subscriptions = counting(amqtt._subscriptions)
        self.retained = amqtt._retained_messages = counting(amqtt._retained_messages)
        self.running.loop.call_soon_threadsafe(amqtt._session_monitor_task.cancel)
        recheck = self.running.broker._recheck
        assert recheck is not None
        self.running.loop.call_soon_threadsafe(recheck.cancel)  # the tests run it when they mean to
        self.passwords = self.running.broker.logins.passwords

    def visits(self) -> tuple[int, int, int]:
        return type(self.sessions).visited, type(self.subscriptions).visited, type(self.retained).visited

    def device(self, device_id: str, **kwargs: Any) -> RawClient:
        self.passwords.setdefault(device_id, f"pw-{device_id}")
        client = self.running.login(device_id, device_id, self.passwords[device_id], **kwargs)
        self.opened.append(client)
        return client

    def connected(self) -> list[str]:
        async def count() -> list[str]:
            return [c for c, (s, _) in dict.items(self.sessions) if s.transitions.state == "connected"]

        return self.running.call(count())

    def close(self) -> None:
        for client in self.opened:
            client.close()
        wait_until(lambda: not self.connected(), 10, "every connection seen closed by the broker")
        self.running.close()  # else the connections' tasks are left pending on a closed event loop


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    """FLEET devices connected, each subscribed to its job topic, where a retained job waits for each
    (QoS 0 throughout: these clients acknowledge nothing)."""
    running = Fleet()
    try:
        service = running.running.login(SERVICE_ID, SERVICE_USERNAME, SERVICE_SECRET)
        running.opened.append(service)
        for i in range(FLEET):
            service.publish(TOPICS.job(f"fleet-{i}"), b"job %d" % i, qos=1, retain=True)
            assert running.device(f"fleet-{i}", clean=False).subscribe(TOPICS.job(f"fleet-{i}"), 0) == 0
        yield running
    finally:
        running.close()


def test_a_connect_and_a_subscribe_visit_only_the_clients_own_session_filters_and_retained_messages(
        fleet: Fleet) -> None:
    before = fleet.visits()
    fleet.opened[0].publish(TOPICS.job("fleet-new"), b"yours", qos=1, retain=True)  # the service's
    newcomer = fleet.device("fleet-new")
    assert newcomer.subscribe(TOPICS.job("fleet-new"), 0) == 0
    assert newcomer.messages(QUIET) == [(TOPICS.job("fleet-new"), b"yours")]  # its own retained job, only
    sessions, filters, retained = (after - was for after, was in zip(fleet.visits(), before, strict=True))
    assert (sessions, filters, retained) == (0, 0, 0)
    assert len(repr(fleet.subscriptions)) < 100  # amqtt logs it after every SUBSCRIBE, debug logging on or not


def test_a_persistent_session_reconnecting_visits_only_its_own_filters(fleet: Fleet) -> None:
    fleet.opened[1].close()  # fleet-0: its session and subscription stay
    before = fleet.visits()
    back = fleet.device("fleet-0", clean=False)
    assert back.session_present
    assert back.messages(QUIET) == [(TOPICS.job("fleet-0"), b"job 0")]  # its retained job, again, as amqtt does
    sessions, filters, retained = (after - was for after, was in zip(fleet.visits(), before, strict=True))
    assert (sessions, filters, retained) == (0, 1, 0)


def test_a_wildcard_subscription_still_gets_every_retained_message_it_may_receive(fleet: Fleet) -> None:
    watcher = fleet.running.login("watcher", OPERATOR_USERNAME, TOKEN)
    fleet.opened.append(watcher)
    assert watcher.subscribe(TOPICS.job("+"), 0) == 0
    assert sorted(watcher.messages(QUIET)) == sorted((TOPICS.job(f"fleet-{i}"), b"job %d" % i) for i in range(FLEET))
    intruder = fleet.device("fleet-0", clean=False)  # a device's own wildcard: nothing of the others' leaks
    assert intruder.subscribe(TOPICS.device("fleet-0", "#"), 0) == 0
    assert set(intruder.messages(QUIET)) == {(TOPICS.job("fleet-0"), b"job 0")}


def test_the_recheck_drops_a_revoked_device_without_a_pass_over_the_sessions(fleet: Fleet) -> None:
    revoked = fleet.opened[1]  # fleet-0
    fleet.passwords["fleet-1"] = "rotated"  # fleet-1 reconnects with its new password: it stays
    rotated = fleet.device("fleet-1", clean=False)
    fleet.passwords["fleet-0"] = "revoked"
    before = fleet.visits()
    assert fleet.running.call(fleet.running.broker.recheck()) == 1
    assert fleet.visits()[0] == before[0]
    assert revoked.closed_by_broker()
    assert rotated.alive()
    assert fleet.running.session_count() == FLEET  # the service's and the devices', less the revoked one's


def test_the_session_monitor_forgets_a_clean_session_gone_without_a_pass_over_the_sessions(fleet: Fleet) -> None:
    amqtt = fleet.running.broker.core._broker

    async def monitor() -> None:  # the fixture stopped it: it runs again, over the counted table
        amqtt._session_monitor_task = asyncio.ensure_future(amqtt._session_monitor())

    fleet.running.call(monitor())
    before = fleet.visits()
    fleet.opened[1].close()  # fleet-0, persistent: its session stays, as amqtt keeps it
    fleet.device("passer-by").close()  # a clean session: forgotten once it is gone
    wait_until(lambda: fleet.running.session_count() == FLEET + 1, 10, "the clean session forgotten")
    wait_until(lambda: "fleet-0" not in fleet.connected(), 10, "fleet-0 seen gone")
    fleet.device("passer-by-2").close()  # a later round, after fleet-0's disconnect was seen
    wait_until(lambda: fleet.running.session_count() == FLEET + 1, 10, "the second clean session forgotten")
    assert fleet.visits()[0] == before[0]  # amqtt's monitor walked every session each second
    assert fleet.device("fleet-0", clean=False).session_present


def test_only_amqtts_connect_pass_in_the_same_task_is_narrowed_to_the_sessions_own_filters() -> None:
    table = _Subscriptions()
    for topic_filter in ("a", "b", "c/#"):
        table[topic_filter] = []

    async def narrowed_then_passed_over(by: Any) -> list[str]:
        table.iterate_once(["b"])
        return await by()

    async def other_code() -> list[str]:
        return list(table)

    async def another_task() -> list[str]:
        return await asyncio.ensure_future(other_code())

    for by in (other_code, another_task):
        assert asyncio.run(narrowed_then_passed_over(by)) == ["a", "b", "c/#"]
    assert list(table) == ["a", "b", "c/#"]
