"""What drain.py and group_latency.py share: a broker and the service, real agents, the raw round trip.

Import `fleet` (which puts the repo on sys.path) before this module.
"""

from __future__ import annotations

import os
import queue
import socket
import statistics
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import Topics
from tests.support.mosquitto import start_mosquitto
from tests.support.processes import Agent, Api, Service, wait_until

BROKERS = ("embedded", "mosquitto")
RAW_PAYLOAD = b"x" * 200  # about the size of a head or status message
FINALS = {"SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED", "INTERRUPTED", "REJECTED"}


def for_each_broker(choice: str, run: Callable[[str, Path], None]) -> None:
    """run(kind, a fresh temporary directory) for the chosen broker, or for each with "both"."""
    for kind in BROKERS if choice == "both" else (choice,):
        with tempfile.TemporaryDirectory(prefix="ota-bench-") as workdir:
            run(kind, Path(workdir))


@contextmanager
def service_on(kind: str, workdir: Path) -> Iterator[tuple[Service, int | None]]:
    """The service on its embedded broker, or on a Mosquitto (the repo's config, open to anonymous
    clients); with Mosquitto's pid (None for the embedded broker, which runs in the service)."""
    with ExitStack() as stack:
        broker = stack.enter_context(start_mosquitto(workdir)) if kind == "mosquitto" else None
        service = Service(workdir, mqtt_url=broker.url if broker else None)
        stack.callback(service.stop)
        service.start()
        yield service, broker.process.pid if broker and broker.process else None


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds the process has used so far (0 for None)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def agents(workdir: Path, service: Service, passwords: dict[str, str]) -> Iterator[list[Agent]]:
    """One real `ota-agent` per device, started and (on exit) stopped."""
    started: list[Agent] = []
    try:
        for device_id, password in passwords.items():
            agent = Agent(workdir, device_id, password, service.broker_url,
                          server_key_file=service.signing_key_file)
            agent.start()
            started.append(agent)
        yield started
    finally:
        for agent in started:
            agent.stop()


def wait_subscribed(started: list[Agent], timeout: float = 30) -> None:
    for agent in started:
        wait_until(lambda agent=agent: "subscribed to" in agent.log(), timeout, f"{agent.name} to subscribe")


def job_final(api: Api, job_id: str, wait_seconds: int = 0) -> dict | None:
    """The job if it is final, else None; with wait_seconds, the service holds the GET until it is
    final or that many seconds passed (GET /v1/job/{id}?WaitSeconds=)."""
    job = api.ok("GET", f"/v1/job/{job_id}" + (f"?WaitSeconds={wait_seconds}" if wait_seconds else ""))
    return job if job["Status"] in FINALS else None


# --- the raw limit ----------------------------------------------------------------------------


def raw_round_trips(service: Service, device_id: str, password: str, count: int) -> float:
    """Bare paho request/answer round trips per second on the service's broker, Nagle off.

    One client, logged in as a registered device (the embedded broker lets a device publish only
    its status and read only its own subtree): it publishes a QoS 1 message on its status topic and
    waits until the broker delivers it back (QoS 1) before sending the next. The service receives
    these too and drops them as bad messages (one warning each in its log).
    """
    topic = Topics().status(device_id)
    got: queue.Queue[bool] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(device_id, password)
    client.on_socket_open = lambda _c, _u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.on_message = lambda *_args: got.put(True)
    client.on_subscribe = lambda *_args: got.put(True)
    port = int(service.broker_url.rsplit(":", 1)[1])
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        got.get(timeout=10)
        for _ in range(20):  # warm-up
            _round_trip(client, topic, got)
        start = time.perf_counter()
        for _ in range(count):
            _round_trip(client, topic, got)
        return count / (time.perf_counter() - start)
    finally:
        client.disconnect()
        client.loop_stop()


def _round_trip(client: mqtt.Client, topic: str, got: queue.Queue[bool]) -> None:
    client.publish(topic, RAW_PAYLOAD, qos=1)
    got.get(timeout=10)


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000
