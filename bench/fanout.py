"""End-to-end job throughput through the service, as a ratio of the broker's raw QoS 1 rate.

    .venv/bin/python bench/fanout.py [--devices 500] [--jobs 3] [--timeout 60]

One Mosquitto (ephemeral port) and one service (--mqtt-url pointing at it). One paho client
stands in for every device: for each new head on ota/v1/devices/+/job it publishes IN_PROGRESS,
then SUCCEEDED. K group jobs over N devices are submitted at once and timed until every child is
final: each group job with one GET ?WaitSeconds, which the service answers once the job is final
(a poll every 100 ms would add up to 100 ms), then one GET of every job to count its final
children. The raw limit, on the same broker: a bare publisher -> subscriber QoS 1 round trip, for as
many messages as the job flow needs (about 4 per child: head, queue list, IN_PROGRESS, final).
The service's CPU time over the job phase is printed per child.
"""

from __future__ import annotations

import argparse
import json
import queue
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from fleet import GROUP, median_seconds, register_fleet, result, timed  # first: puts the repo on sys.path
from paho.mqtt.enums import CallbackAPIVersion
from stack import cpu_seconds

from agent.protocol import JobStatus, Key, Topics, encode, format_time, is_idle_head, utc_now
from tests.support.mosquitto import start_mosquitto
from tests.support.processes import Api, Service

MESSAGES_PER_CHILD = 4
RAW_WINDOW = 1000  # raw messages in flight at most, so the broker never drops any
RAW_PAYLOAD = b"x" * 200  # about the size of a head or status message
RAW_RUNS = 3  # the raw limit is the best of these
WAIT_SECONDS = 5  # one held GET at most this long, then another, until the timeout
FINALS = {s.value for s in JobStatus if s.is_final}


def new_client(client_id: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(1000)  # the raw pump keeps at most RAW_WINDOW (1000) in flight
    return client


def connect(client: mqtt.Client, port: int, topic: str | None = None) -> None:
    """Connect, start the network thread, and (if given) subscribe at QoS 1 and wait for the grant."""
    granted = queue.Queue()
    client.on_subscribe = lambda *_args: granted.put(True)
    client.connect("127.0.0.1", port)
    client.loop_start()
    if topic is not None:
        client.subscribe(topic, qos=1)
        granted.get(timeout=10)


def close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


# --- the simulated devices --------------------------------------------------------------------


class Devices:
    """One client for every device; paho's callback only enqueues, a worker thread answers."""

    def __init__(self, port: int) -> None:
        self.port, self.topics = port, Topics()
        self.inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self.answered: set[str] = set()
        self.client = new_client("bench-devices")
        self.client.on_message = lambda _c, _u, msg: self.inbox.put((msg.topic, msg.payload))
        self.worker = threading.Thread(target=self._work, name="bench-devices", daemon=True)

    def __enter__(self) -> "Devices":
        self.worker.start()
        connect(self.client, self.port, self.topics.all_devices(Topics.JOB))
        return self

    def __exit__(self, *_exc: object) -> None:
        close(self.client)
        self.inbox.put(None)
        self.worker.join(10)

    def _work(self) -> None:
        while (item := self.inbox.get()) is not None:
            self._answer(*item)

    def _answer(self, topic: str, payload: bytes) -> None:
        head = json.loads(payload) if payload else {}
        if is_idle_head(head):
            return  # a cleared or idle head: nothing to run
        job_id = head[Key.JOB_ID]
        if job_id in self.answered:
            return
        self.answered.add(job_id)
        device_id, _leaf = self.topics.parse(topic)
        started = format_time(utc_now())
        self._report(device_id, {Key.JOB_ID: job_id, Key.STATUS: JobStatus.IN_PROGRESS.value, Key.START_TIME: started})
        self._report(device_id, {Key.JOB_ID: job_id, Key.STATUS: JobStatus.SUCCEEDED.value, Key.EXIT_CODE: 0,
                                 Key.STDOUT: "", Key.STDERR: "", Key.START_TIME: started,
                                 Key.END_TIME: format_time(utc_now())})

    def _report(self, device_id: str, message: dict) -> None:
        self.client.publish(self.topics.status(device_id), encode(message), qos=1)


# --- the job flow -----------------------------------------------------------------------------


def submit_all(api: Api, workflow_id: str, jobs: int) -> tuple[list[str], list[float]]:
    """Submit the group jobs back to back; returns their ids and each POST's seconds."""
    ids, seconds = [], []
    for i in range(jobs):
        took, job_id = timed(lambda i=i: api.submit(workflow_id, f"bench-{i}", DeviceGroup=GROUP))
        ids.append(job_id)
        seconds.append(took)
    return ids, seconds


def final_children(api: Api, job_ids: list[str]) -> int:
    """How many children of these group jobs are final now."""
    results = [api.ok("GET", f"/v1/job/{job_id}")["Result"] for job_id in job_ids]
    return sum(result[status] for result in results for status in FINALS)


def wait_children(api: Api, job_ids: list[str], timeout: float) -> int:
    """Wait until every job is final (a held GET each) or the timeout passes; returns how many children are final."""
    deadline = time.monotonic() + timeout
    for job_id in job_ids:
        while time.monotonic() < deadline:
            wait = max(1, min(WAIT_SECONDS, int(deadline - time.monotonic())))
            if api.ok("GET", f"/v1/job/{job_id}?WaitSeconds={wait}")["Status"] in FINALS:
                break
    return final_children(api, job_ids)


# --- the raw limit ----------------------------------------------------------------------------


def raw_rate(port: int, count: int) -> float:
    """Messages/s from a bare QoS 1 publisher to a bare QoS 1 subscriber on the same broker."""
    received: queue.Queue[bool] = queue.Queue()
    subscriber, publisher = new_client("bench-raw-sub"), new_client("bench-raw-pub")
    subscriber.on_message = lambda *_args: received.put(True)
    try:
        connect(subscriber, port, "bench/raw")
        connect(publisher, port)
        return count / timed(lambda: _pump(publisher, received, count))[0]
    finally:
        close(publisher)
        close(subscriber)


def _pump(publisher: mqtt.Client, received: queue.Queue, count: int) -> None:
    sent = got = 0
    while got < count:
        while sent < count and sent - got < RAW_WINDOW:
            publisher.publish("bench/raw", RAW_PAYLOAD, qos=1)
            sent += 1
        received.get(timeout=10)
        got += 1


# --- main -------------------------------------------------------------------------------------


def run(workdir: Path, devices: int, jobs: int, timeout: float) -> None:
    with start_mosquitto(workdir) as broker:
        service = Service(workdir, mqtt_url=broker.url)
        try:
            service.start()
            measure(service, broker.port, devices, jobs, timeout)
        finally:
            service.stop()


def measure(service: Service, port: int, devices: int, jobs: int, timeout: float) -> None:
    api = service.api
    print(f"registered {devices} devices in {register_fleet(api, devices):.1f} s")
    workflow_id = api.workflow("true", name="bench")
    health = median_seconds(lambda: api.request("GET", "/livez"), 21)  # a bare answer: no database, no broker
    with Devices(port):
        cpu = cpu_seconds(service.proc.pid if service.proc else None)
        took, (done, submits) = timed(lambda: _flow(api, workflow_id, jobs, timeout))
        cpu = cpu_seconds(service.proc.pid if service.proc else None) - cpu
    raw = max(raw_rate(port, devices * jobs * MESSAGES_PER_CHILD) for _ in range(RAW_RUNS))
    report(devices, jobs, done, took, raw, submits, health, cpu)


def _flow(api: Api, workflow_id: str, jobs: int, timeout: float) -> tuple[int, list[float]]:
    """Submit, wait; returns how many children are final and each submit's seconds."""
    job_ids, submits = submit_all(api, workflow_id, jobs)
    return wait_children(api, job_ids, timeout), submits


def report(devices: int, jobs: int, done: int, took: float, raw: float, submits: list[float], health: float,
           cpu: float) -> None:
    children = devices * jobs
    rate = done / took
    late = "" if done >= children else " (TIMED OUT: the rate counts the children final by then)"
    print(f"child jobs final:      {done} of {children} ({jobs} group jobs x {devices} devices) in {took:.2f} s{late}")
    print(f"child jobs/s:          {rate:.0f}")
    print(f"raw QoS 1 msgs/s:      {raw:.0f} "
          f"({children * MESSAGES_PER_CHILD} messages, publisher -> subscriber, best of {RAW_RUNS})")
    print(f"ratio (jobs/s x {MESSAGES_PER_CHILD}) / raw: {rate * MESSAGES_PER_CHILD / raw:.3f}")
    print(f"submit of one group job of {devices} devices: {submits[0] * 1000:.1f} ms "
          f"(all {jobs}: {', '.join(f'{s * 1000:.0f}' for s in submits)} ms)")
    print(f"service CPU per child: {cpu / children * 1000:.3f} ms (the job phase: {cpu:.2f} s)")
    print(f"GET /livez:            {health * 1000:.2f} ms (median of 21)")
    print(f"ratio submit / health: {submits[0] / health:.0f}")
    raw_seconds = children * MESSAGES_PER_CHILD / raw  # the raw messages the flow needs, at the raw rate
    result("fanout-e2e", took, "s", raw_seconds, took / raw_seconds, "ratio <= 1.5", devices=devices, jobs=jobs,
           final=done, children=children, submit_ms=submits[0] * 1000,
           service_cpu_ms_per_child=cpu / children * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=500, help="simulated devices in the group (default 500)")
    parser.add_argument("--jobs", type=int, default=3, help="group jobs submitted at once (default 3)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for every child (default 60)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ota-bench-") as workdir:
        run(Path(workdir), args.devices, args.jobs, args.timeout)


if __name__ == "__main__":
    main()
