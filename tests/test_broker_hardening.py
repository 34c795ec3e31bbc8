"""The embedded broker against a client that speaks raw MQTT, as an attacker would (issue 7).

Most tests run a real embedded broker in this process (on its own thread and event loop), so
they can count its sessions; the logins it accepts are a fixed table. The last ones run the
real service, whose logins come from its database and its CLI.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from typing import Any, Coroutine, Iterator, Sequence, TypeVar

import pytest

from agent.protocol import OPERATOR_USERNAME, Topics
from ota_bridge.embedded_broker import SERVICE_USERNAME, EmbeddedBroker, Login, Logins, TopicPolicy, start_broker
from ota_bridge.settings import HostPort
from tests.support.mosquitto import free_port
from tests.support.processes import Service, wait_until
from tests.support.raw_mqtt import RawClient, Will, publish_header, publish_packet, subscribe_packet

T = TypeVar("T")
TOPICS = Topics()
SERVICE_ID, SERVICE_SECRET, TOKEN = SERVICE_USERNAME, "service-secret", "operator-token"
DEVICES = {"dev-a": "pw-a", "dev-b": "pw-b", "dev-c": "pw-c"}
ALL_STATUS = TOPICS.status("+")
QUIET = 1.0  # seconds a client listens for what it must never get


class FixedLogins:
    """The service's rules (device id == username, the service's id only for the service) over a fixed table."""

    def __init__(self) -> None:
        self.passwords = {SERVICE_USERNAME: SERVICE_SECRET, OPERATOR_USERNAME: TOKEN, **DEVICES}

    async def check(self, login: Login) -> bool:
        if self.passwords.get(login.username) != login.password:
            return False
        return login.username == OPERATOR_USERNAME or login.client_id == login.username

    async def still_valid(self, logins: Sequence[Login]) -> list[bool]:
        return [await self.check(login) for login in logins]

    async def changed(self) -> None:
        return None  # the table tells no changes: the re-check looks at every session


class BrokerThread:
    """A real embedded broker on an ephemeral port, its event loop on a thread of its own."""

    def __init__(self, service_in_process: bool = False, logins: Logins | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = free_port()
        self.broker: EmbeddedBroker = self.call(
            start_broker(HostPort("127.0.0.1", self.port), logins or FixedLogins(), TopicPolicy(TOPICS),
                         service_in_process=service_in_process))

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def session_count(self) -> int:
        async def count() -> int:
            return self.broker.session_count()

        return self.call(count())

    def client(self) -> RawClient:
        return RawClient(self.port)

    def login(self, client_id: str, username: str, password: str, **kwargs: Any) -> RawClient:
        client = self.client()
        assert client.connect(client_id, username, password, **kwargs) == 0, f"{username} could not log in"
        return client

    def close(self) -> None:
        self.call(self.broker.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()  # else its self-pipe is left for the garbage collector to warn about in another test


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerThread]:
    running = BrokerThread()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def clients() -> Iterator[list[RawClient]]:
    opened: list[RawClient] = []
    yield opened
    for client in opened:
        client.close()


def the_service(broker: BrokerThread, clients: list[RawClient]) -> RawClient:
    """A client in the service's place: its id and secret, a persistent session, every status topic."""
    service = broker.login(SERVICE_ID, SERVICE_USERNAME, SERVICE_SECRET, clean=False)
    clients.append(service)
    assert service.subscribe(ALL_STATUS) == 1
    return service


def device(broker: BrokerThread, clients: list[RawClient], device_id: str, **kwargs: Any) -> RawClient:
    client = broker.login(device_id, device_id, DEVICES[device_id], **kwargs)
    clients.append(client)
    return client


ATTACKS = {  # what a stranger may send in the name of a client
    "anonymous": {},
    "wrong password": {"username": "dev-b", "password": "guess"},
    "another device's login": {"username": "dev-b", "password": DEVICES["dev-b"]},
}


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "persistent"])
@pytest.mark.parametrize("attack", ATTACKS)
def test_a_refused_connect_in_the_services_name_leaves_its_session_alone(
        broker: BrokerThread, clients: list[RawClient], attack: str, clean: bool) -> None:
    service = the_service(broker, clients)
    stranger = broker.client()
    clients.append(stranger)
    assert stranger.connect(SERVICE_ID, clean=clean, **ATTACKS[attack]) == 5
    assert service.alive()
    device(broker, clients, "dev-a").publish(TOPICS.status("dev-a"), b"result", qos=1)
    assert (TOPICS.status("dev-a"), b"result") in service.messages(QUIET)


def test_the_services_own_login_is_refused_over_tcp_when_it_is_attached_in_process() -> None:
    """The service talks to its embedded broker in-process (service_link.py): its name, even with
    the right secret, is no login for a connection, which could otherwise read every device's messages."""
    running = BrokerThread(service_in_process=True)
    try:
        before = running.session_count()
        for clean in (True, False):
            client = running.client()
            try:
                assert client.connect(SERVICE_ID, SERVICE_USERNAME, SERVICE_SECRET, clean=clean) == 5
            finally:
                client.close()
        assert running.session_count() == before
        running.login("dev-a", "dev-a", DEVICES["dev-a"]).close()  # devices still log in
    finally:
        running.close()


def test_a_refused_clients_will_is_never_merged_into_a_session(broker: BrokerThread, clients: list[RawClient]) -> None:
    service = the_service(broker, clients)
    head = TOPICS.job("dev-c")
    service.publish(head, b"the head", qos=1, retain=True)
    stranger = broker.client()
    clients.append(stranger)
    assert stranger.connect(SERVICE_ID, clean=False, will=Will(head, b"", retain=True)) == 5
    stranger.close()  # an abnormal end: a will merged into the service's session would be sent now
    assert service.alive()
    watcher = device(broker, clients, "dev-c")
    watcher.subscribe(head)
    assert watcher.messages(QUIET) == [(head, b"the head")]


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "persistent"])
@pytest.mark.parametrize("attack", ATTACKS)
def test_a_refused_connect_in_a_devices_name_leaves_the_device_alone(
        broker: BrokerThread, clients: list[RawClient], attack: str, clean: bool) -> None:
    service = the_service(broker, clients)
    victim = device(broker, clients, "dev-a", clean=False)
    assert victim.subscribe(TOPICS.job("dev-a")) == 1
    stranger = broker.client()
    clients.append(stranger)
    assert stranger.connect("dev-a", clean=clean, **ATTACKS[attack]) == 5
    assert victim.alive()
    service.publish(TOPICS.job("dev-a"), b"a job", qos=1)
    assert (TOPICS.job("dev-a"), b"a job") in victim.messages(QUIET)


def test_a_session_of_another_user_is_dropped_not_merged_into(broker: BrokerThread, clients: list[RawClient]) -> None:
    operator = broker.login("dev-c", OPERATOR_USERNAME, TOKEN, clean=False)  # an id no device had yet
    clients.append(operator)
    assert operator.subscribe(ALL_STATUS) == 1
    owner = device(broker, clients, "dev-c", clean=False)
    assert not owner.session_present
    assert operator.closed_by_broker()


def test_refused_logins_leave_no_session_behind(broker: BrokerThread) -> None:
    before = broker.session_count()
    for i in range(50):
        for client_id, kwargs in ((f"stranger-{i}", {}), (f"stranger-{i}", {"clean": False}),
                                  ("dev-b", {"username": "dev-b", "password": "guess", "clean": False}),
                                  (f"will-{i}", {"username": "x", "password": "y", "will": Will("any/topic")})):
            client = broker.client()
            try:
                assert client.connect(client_id, **kwargs) == 5
            finally:
                client.close()
    assert broker.session_count() == before


def test_a_device_may_not_leave_a_will_on_another_topic(broker: BrokerThread, clients: list[RawClient]) -> None:
    client = broker.client()
    clients.append(client)
    assert client.connect("dev-a", "dev-a", DEVICES["dev-a"], will=Will(TOPICS.job("dev-b"))) == 5


def test_a_packet_over_the_limit_is_refused_before_its_body_is_read(
        broker: BrokerThread, clients: list[RawClient]) -> None:
    service = the_service(broker, clients)
    sender = device(broker, clients, "dev-a")
    sender.send(publish_header(TOPICS.status("dev-a"), 2 * 1024 * 1024) + b"x" * 65536)  # of its 2 MiB
    assert sender.closed_by_broker()
    device(broker, clients, "dev-b").publish(TOPICS.status("dev-b"), b"still here", qos=1)
    assert (TOPICS.status("dev-b"), b"still here") in service.messages(QUIET)


def test_a_packet_over_the_limit_is_refused_as_the_first_packet(broker: BrokerThread) -> None:
    before = broker.session_count()
    client = broker.client()
    try:
        client.send(b"\x10" + bytes((0xFF, 0xFF, 0xFF, 0x7F)))  # a CONNECT claiming 256 MiB
        assert client.closed_by_broker()
    finally:
        client.close()
    assert broker.session_count() == before


def test_a_900_kib_message_from_a_device_is_delivered(broker: BrokerThread, clients: list[RawClient]) -> None:
    service = the_service(broker, clients)
    payload = b"o" * (900 * 1024)
    device(broker, clients, "dev-a").publish(TOPICS.status("dev-a"), payload, qos=1)
    assert (TOPICS.status("dev-a"), payload) in service.messages(5)


def test_a_device_reconnecting_takes_over_its_own_session(broker: BrokerThread, clients: list[RawClient]) -> None:
    service = the_service(broker, clients)
    old = device(broker, clients, "dev-b", clean=False)
    assert old.subscribe(TOPICS.job("dev-b")) == 1
    new = device(broker, clients, "dev-b", clean=False)
    assert old.closed_by_broker()
    service.publish(TOPICS.job("dev-b"), b"next job", qos=1)
    assert (TOPICS.job("dev-b"), b"next job") in new.messages(QUIET)


def test_two_operators_watch_at_once(broker: BrokerThread, clients: list[RawClient]) -> None:
    watchers = [broker.login(f"watcher-{i}", OPERATOR_USERNAME, TOKEN) for i in range(2)]
    clients.extend(watchers)
    for watcher in watchers:
        assert watcher.subscribe(ALL_STATUS) == 1
    device(broker, clients, "dev-a").publish(TOPICS.status("dev-a"), b"seen", qos=1)
    for watcher in watchers:
        assert (TOPICS.status("dev-a"), b"seen") in watcher.messages(QUIET)


def test_a_silent_client_is_disconnected_after_one_and_a_half_keep_alives_and_its_will_sent(
        broker: BrokerThread, clients: list[RawClient]) -> None:
    """MQTT-3.1.2-24, enforced by the front. amqtt 0.12 only starts its read again when a client's
    keep-alive runs out: a device cut off without a FIN stayed online, its will never sent."""
    watcher = broker.login("watcher-keep-alive", OPERATOR_USERNAME, TOKEN)
    clients.append(watcher)
    assert watcher.subscribe(TOPICS.presence("dev-c")) == 1
    pinging = device(broker, clients, "dev-b", keep_alive=2)
    silent = device(broker, clients, "dev-c", keep_alive=1, will=Will(TOPICS.presence("dev-c"), b"gone", retain=False))
    for _ in range(8):  # 4 s, a PINGREQ every half second: well within dev-b's 3 s
        time.sleep(0.5)
        assert pinging.alive()
    assert silent.closed_by_broker(timeout=10)
    assert watcher.messages(QUIET) == [(TOPICS.presence("dev-c"), b"gone")]


# --- the real service: logins from its database, tokens revoked with its CLI ----------------


def cli(service: Service, *args: str) -> str:
    argv = [sys.executable, "-m", "ota_bridge", *args, "--data-dir", str(service.data_dir)]
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout.strip()


def test_a_revoked_tokens_session_is_dropped(service: Service) -> None:
    token = cli(service, "token", "create", "--name", "watcher")
    watcher = RawClient(service.mqtt_port)
    try:
        assert watcher.connect("watcher-1", OPERATOR_USERNAME, token) == 0
        assert watcher.subscribe(TOPICS.status("+")) == 1
        cli(service, "token", "revoke", "--name", "watcher")
        assert watcher.closed_by_broker(timeout=15)
    finally:
        watcher.close()
    again = RawClient(service.mqtt_port)
    try:
        assert again.connect("watcher-1", OPERATOR_USERNAME, token) == 5
    finally:
        again.close()


def test_the_service_still_hears_devices_after_a_stranger_used_its_client_id(service: Service) -> None:
    api = service.api
    password = api.device("hardened-1")
    stranger = RawClient(service.mqtt_port)
    try:
        assert stranger.connect(SERVICE_ID) == 5
    finally:
        stranger.close()
    agent = RawClient(service.mqtt_port)
    try:
        assert agent.connect("hardened-1", "hardened-1", password) == 0
        agent.publish(TOPICS.presence("hardened-1"), b'{"Presence": "online"}', qos=1, retain=True)
        wait_until(lambda: api.ok("GET", "/v1/device/hardened-1")["Online"], 10, "the device to show online")
    finally:
        agent.close()



def subscriptions(prefix: str, count: int) -> bytes:
    """SUBSCRIBE packets for count new filters, sent as one burst."""
    return b"".join(subscribe_packet(TOPICS.status(f"{prefix}-{k}"), 0, k + 1) for k in range(count))


def test_a_watcher_misses_nothing_while_others_subscribe(broker: BrokerThread, clients: list[RawClient]) -> None:
    """amqtt 0.12 iterates its subscriptions across awaits: one added mid-broadcast lost the rest (issue 12)."""
    first, watcher = (broker.login(f"watcher-{i}", OPERATOR_USERNAME, TOKEN) for i in range(2))
    clients += [first, watcher]
    assert first.subscribe(TOPICS.status("dev-a")) == 1  # the filter before the watcher's
    assert watcher.subscribe(TOPICS.device("dev-a", "+")) == 1
    joining = [broker.login(f"joining-{i}", OPERATOR_USERNAME, TOKEN) for i in range(20)]
    clients.extend(joining)
    sender = device(broker, clients, "dev-a")
    messages = [b"m%d" % n for n in range(300)]
    bursts = [threading.Thread(target=client.send, args=(subscriptions(f"new-{i}", 20),))
              for i, client in enumerate(joining)]
    for burst in bursts:
        burst.start()
    sender.send(b"".join(publish_packet(TOPICS.status("dev-a"), m) for m in messages))
    for burst in bursts:
        burst.join()
    assert [payload for _, payload in watcher.messages(3)] == messages


def test_messages_are_routed_as_they_are_published_without_amqtts_broadcast_loop() -> None:
    """The broker routes each message when it is published (core._IsolatingBroker): live messages,
    a will, and a message kept for a persistent session while it is away all arrive with amqtt's
    own broadcast loop stopped. On plain amqtt 0.12 nothing would arrive."""
    running = BrokerThread()
    opened: list[RawClient] = []
    try:
        running.call(running.broker.core._broker._shutdown_broadcast_loop())  # amqtt's queue and loop: gone
        service = the_service(running, opened)
        assert service.subscribe(TOPICS.presence("+")) == 1
        operator = running.login("watcher", OPERATOR_USERNAME, TOKEN)
        opened.append(operator)
        assert operator.subscribe(TOPICS.device("dev-a", "#")) == 1
        dev_a = device(running, opened, "dev-a", will=Will(TOPICS.presence("dev-a"), b"gone", retain=True))
        assert dev_a.subscribe(TOPICS.job("dev-a")) == 1
        service.publish(TOPICS.job("dev-a"), b"head", qos=1)
        assert dev_a.messages(QUIET) == [(TOPICS.job("dev-a"), b"head")]
        dev_a.publish(TOPICS.status("dev-a"), b"result", qos=1)
        assert (TOPICS.status("dev-a"), b"result") in service.messages(QUIET)
        assert operator.messages(QUIET) == [(TOPICS.job("dev-a"), b"head"), (TOPICS.status("dev-a"), b"result")]
        dev_a.sock.close()  # gone without a DISCONNECT: its will is published
        assert (TOPICS.presence("dev-a"), b"gone") in service.messages(QUIET)
        service.close()  # its session persists; what comes meanwhile is kept for it
        device(running, opened, "dev-b").publish(TOPICS.status("dev-b"), b"while away", qos=1)
        back = running.login(SERVICE_ID, SERVICE_USERNAME, SERVICE_SECRET, clean=False)
        opened.append(back)
        assert (TOPICS.status("dev-b"), b"while away") in back.messages(QUIET)
    finally:
        for client in opened:
            client.close()
        running.close()


def test_routes_are_the_holders_of_the_topic_and_of_the_wildcard_filters_matching_it() -> None:
    from ota_bridge.embedded_broker.core import _Subscriptions  # noqa: PLC0415 - the routing table itself

    def matches(topic: str, topic_filter: str) -> bool:
        levels, wanted = topic.split("/"), topic_filter.split("/")
        if wanted[-1] == "#":
            return levels[:len(wanted) - 1] == wanted[:-1]
        return len(levels) == len(wanted) and all(w in ("+", t) for t, w in zip(levels, wanted, strict=True))

    table = _Subscriptions()
    table["a/b/c"] = [("exact", 1)]
    table["a/+/c"] = [("plus", 1)]
    table["x/#"] = [("elsewhere", 0)]
    table["a/#"] = [("hash", 0), ("hash2", 1)]
    assert table.routes("a/b/c", matches) == [("exact", 1), ("plus", 1), ("hash", 0), ("hash2", 1)]
    assert table.routes("a/z", matches) == [("hash", 0), ("hash2", 1)]
    assert table.routes("q", matches) == []
    del table["a/#"]
    assert list(table.wildcards) == ["a/+/c", "x/#"]
    table.clear()
    assert table.wildcards == {} and table.routes("a/b/c", matches) == []
