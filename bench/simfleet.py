"""A fleet simulator: N devices with the agent's load-bearing logic, one event loop per process.

    .venv/bin/python bench/simfleet.py --devices 10000 --processes 2 [--jobs 1] [--restart] [--broker embedded]

Starts Mosquitto (the repo's config, open to anonymous clients, `max_connections -1`, the open
file limit raised to its hard limit) and the service on it (`--mqtt-url`), registers N devices in
one group through `POST /v1/device` (a few requests at a time), then starts K simulator
processes, each holding its share of the devices on one asyncio loop over plain sockets
(MQTT 3.1.1 written small, packets from tests/support/raw_mqtt.py). Each device does what the
real agent does that costs the service and the broker something:

- logs in with its own id and password (persistent session, client id = device id, a retained
  "offline" presence as its will), says "online" (retained, QoS 1), subscribes to its job topic;
- for every head: parses it (agent/head.py), verifies its Ed25519 signature with the service's
  key (agent/job_signature.py, the agent's verifier: OpenSSL or pure Python), checks it is for
  this device and above the Floor it has seen, keeps a small in-memory journal;
- for a new job head: reports IN_PROGRESS, then SUCCEEDED with the result a `true` command gives
  (exit code 0, empty output), QoS 1 on its status topic, without starting any process; a head for
  a job it already ran gets the journal's result again, as the agent resends it.

Then it submits `--jobs` group jobs (`true`) one after another, each timed from `POST /v1/job`
until `GET /v1/job/{id}` counts every child final; with `--restart` it restarts the service and
times until every device has verified a head again (the service republishes each head at
start-up). Progress is printed every few seconds; the summary gives each phase's time, the job
throughput, and the RSS of the service, Mosquitto and the simulator processes. With an open
broker the device passwords are sent but not checked; `--accounts` runs Mosquitto as shipped
(logins and ACLs from the service's `--mosquitto-dir`), which makes registration much slower.

`--broker embedded` runs the same fleet against the service's own broker instead (the service
started without `--mqtt-url`, the devices on its `--mqtt-listen` port, logins and ACLs checked
there): the broker runs in the service's process, so the service's CPU and RSS include it
(no `--restart` there: it would restart the broker too, and the simulated devices do not reconnect).
`--idle S` holds the connected fleet for S seconds (keep-alive pings only) and gives the CPU the
service (and Mosquitto) used meanwhile.

Exits 1 if any phase did not finish within `--timeout` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fleet  # puts the repo on sys.path

from agent import job_signature, protocol
from agent.head import Head, parse_head
from agent.protocol import JobStatus, Key, MessageError, Presence, Topics
from agent.runner import RunResult, in_progress_message
from tests.support.raw_mqtt import PUBACK, PUBLISH, SUBACK, Will, connect_packet, publish_packet, subscribe_packet

GROUP = "sim"  # the devices the simulators connect
OFFLINE_GROUP = "sim-offline"  # registered beyond --connect: never connected, so no group job waits for them
KEEPALIVE_SECONDS = 60
PING_EVERY_SECONDS = 20
CONNECTS_IN_FLIGHT = 100  # per process: connections being opened at once
JOURNAL_ENTRIES = 20  # per device: the newest jobs it ran, as the agent's journal keeps them
REPORT_SECONDS = 1.0  # how often a simulator process reports its counters
REGISTER_THREADS = 2  # bulk registration requests in flight (--register-threads): the service hashes
# a request's passwords on one thread per core, so two keep it busy
RETAINED_QUIET_SECONDS = 10  # reading the retained heads after a restart ends once none came for this long
CONNACK = 2
# Appended to the repo's mosquitto.conf for a large fleet (its max_queued_messages already covers the
# service's session at 10,000 devices: see the comment there).
BROKER_LINES = ["max_connections -1"]
DROPPED = "Outgoing messages are being dropped"
SILENT = "1.5 times its keep-alive"  # the embedded broker's log line for a client it disconnected as silent
PINGREQ = b"\xc0\x00"
FINALS = {s.value for s in JobStatus if s.is_final}


# --- one simulator process --------------------------------------------------------------------


@dataclass
class Counters:
    connected: int = 0
    refused: int = 0
    subscribed: int = 0
    heads: int = 0  # heads whose signature verified, for this device
    rejected: int = 0  # heads that did not (bad signature, another device's)
    ran: int = 0  # jobs run (IN_PROGRESS then SUCCEEDED sent)
    resent: int = 0  # results resent from the journal
    lost: int = 0  # connections the broker closed
    fresh: int = 0  # devices whose newest verified head was issued at or after the mark (see Simulator.mark)


@dataclass
class SimDevice:
    device_id: str
    password: str
    topics: Topics
    floor: int = 0
    issued_at: float = 0.0  # the IssuedAt of the newest head it verified (epoch seconds)
    journal: dict[str, dict[str, Any]] = field(default_factory=dict)  # job id -> its final status message
    next_packet_id: int = 0
    writer: asyncio.StreamWriter | None = None

    def packet_id(self) -> int:
        self.next_packet_id = self.next_packet_id % 65535 + 1
        return self.next_packet_id

    def publish(self, topic: str, message: dict[str, Any], retain: bool = False) -> None:
        assert self.writer is not None
        self.writer.write(publish_packet(topic, protocol.encode(message), qos=1, retain=retain,
                                         packet_id=self.packet_id()))

    def report(self, message: dict[str, Any]) -> None:
        self.publish(self.topics.status(self.device_id), message)


class Simulator:
    """The devices of one process, on one asyncio loop."""

    def __init__(self, port: int, keys: tuple[bytes, ...], devices: list[tuple[str, str]]) -> None:
        self.port, self.keys = port, keys
        topics = Topics()
        self.devices = [SimDevice(device_id, password, topics) for device_id, password in devices]
        self.counters = Counters()
        self.mark = float("inf")  # set from a "mark EPOCH" line on stdin: count devices with a head since then

    async def run(self) -> None:
        gate = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
        tasks = [asyncio.create_task(self._device(device, gate)) for device in self.devices]
        tasks += [asyncio.create_task(self._pings()), asyncio.create_task(self._reports())]
        await asyncio.gather(*tasks)

    async def _device(self, device: SimDevice, gate: asyncio.Semaphore) -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            will = Will(device.topics.presence(device.device_id), protocol.encode(_presence(Presence.OFFLINE)))
            writer.write(connect_packet(device.device_id, device.device_id, device.password, clean=False,
                                        will=will, keep_alive=KEEPALIVE_SECONDS))
            kind, _flags, body = await _read_packet(reader)
            if kind != CONNACK or body[1] != 0:
                self.counters.refused += 1
                writer.close()
                return
        self.counters.connected += 1
        device.writer = writer
        device.publish(device.topics.presence(device.device_id), _presence(Presence.ONLINE), retain=True)
        writer.write(subscribe_packet(device.topics.job(device.device_id), qos=1, packet_id=device.packet_id()))
        try:
            await self._serve(device, reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.counters.lost += 1
            device.writer = None

    async def _serve(self, device: SimDevice, reader: asyncio.StreamReader) -> None:
        assert device.writer is not None
        while True:
            kind, flags, body = await _read_packet(reader)
            if kind == SUBACK:
                self.counters.subscribed += 1
            elif kind == PUBLISH:
                size = struct.unpack("!H", body[:2])[0]
                skip = 2 + size
                if flags & 0x06:
                    device.writer.write(bytes((PUBACK << 4, 2)) + body[skip:skip + 2])
                    skip += 2
                self._on_head(device, body[skip:])

    def _on_head(self, device: SimDevice, payload: bytes) -> None:
        """What the agent checks and does for a head, minus the process (the command is `true`)."""
        try:
            head = parse_head(payload, protocol.DEFAULT_TIMEOUT_SECONDS)
        except MessageError:
            self.counters.rejected += 1
            return
        problem = job_signature.signature_problem(head.signature, head.signed_content, self.keys)
        if problem is not None or head.device_id != device.device_id:
            self.counters.rejected += 1
            self._reject(device, head, problem or f"the job is for device {head.device_id}")
            return
        self.counters.heads += 1
        if head.issued_at is not None:
            device.issued_at = max(device.issued_at, head.issued_at.timestamp())
        if head.is_idle or head.seq is None:
            device.floor = max(device.floor, head.floor or 0)
            return
        if head.job_id in device.journal:
            device.report(device.journal[head.job_id])
            self.counters.resent += 1
        elif head.seq > device.floor:
            self._run_true(device, head)

    def _run_true(self, device: SimDevice, head: Head) -> None:
        assert head.job_id is not None
        start = protocol.utc_now()
        device.report(in_progress_message(head.job_id, start))
        result = RunResult(head.job_id, JobStatus.SUCCEEDED, 0, "", "", False, False, start, protocol.utc_now())
        device.journal[head.job_id] = result.status_message()
        while len(device.journal) > JOURNAL_ENTRIES:
            del device.journal[next(iter(device.journal))]
        device.report(device.journal[head.job_id])
        self.counters.ran += 1

    def _reject(self, device: SimDevice, head: Head, reason: str) -> None:
        if head.job_id is not None:
            now = protocol.utc_now()
            device.report(RunResult.without_output(head.job_id, JobStatus.REJECTED, now, reason).status_message())

    async def _pings(self) -> None:
        while True:
            await asyncio.sleep(PING_EVERY_SECONDS)
            for device in self.devices:
                if device.writer is not None:
                    device.writer.write(PINGREQ)

    async def _reports(self) -> None:
        while True:
            self.counters.fresh = sum(1 for device in self.devices if device.issued_at >= self.mark)
            print(json.dumps(vars(self.counters)), flush=True)
            await asyncio.sleep(REPORT_SECONDS)


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first >> 4, first & 0x0F, await reader.readexactly(length) if length else b""


def _presence(presence: Presence) -> dict[str, Any]:
    return {Key.PRESENCE: presence.value, Key.TIME: protocol.format_time(protocol.utc_now()),
            Key.AGENT_VERSION: "simfleet"}


def _read_marks(simulator: Simulator) -> None:
    for line in sys.stdin:
        if line.startswith("mark "):
            simulator.mark = float(line.split()[1])


def worker_main(config_file: str) -> None:
    """A simulator process: its devices from a JSON file; counters as JSON lines on stdout."""
    raise_file_limit()
    config = json.loads(Path(config_file).read_text())
    keys = job_signature.parse_public_keys(config["keys"])
    simulator = Simulator(config["port"], keys, [tuple(d) for d in config["devices"]])
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    threading.Thread(target=_read_marks, args=(simulator,), daemon=True).start()
    asyncio.run(simulator.run())


# --- the bench: broker, service, registration, workers ----------------------------------------


def raise_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_mib(pid: int | None) -> float:
    if pid is None:
        return 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int | None) -> float:
    """The CPU time (user and system) a process has used so far: a figure other processes' load
    moves far less than wall times on a shared machine."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Workers:
    """The simulator processes, and the sum of their latest counters."""

    def __init__(self, workdir: Path, port: int, keys: str, devices: list[tuple[str, str]], count: int) -> None:
        self.latest: list[dict[str, int]] = [{} for _ in range(count)]
        self.processes: list[subprocess.Popen[str]] = []
        for n in range(count):
            config = workdir / f"simfleet-{n}.json"
            config.write_text(json.dumps({"port": port, "keys": keys, "devices": devices[n::count]}))
            process = subprocess.Popen([sys.executable, __file__, "--worker", str(config)], stdout=subprocess.PIPE,
                                       stdin=subprocess.PIPE,
                                       stderr=(workdir / f"simfleet-{n}.log").open("w"), text=True)
            self.processes.append(process)
            threading.Thread(target=self._read, args=(n, process), daemon=True).start()

    def _read(self, n: int, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.latest[n] = json.loads(line)

    def mark(self, epoch: float) -> None:
        """From now on the workers count (as "fresh") the devices with a head issued at or after epoch."""
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(f"mark {epoch}\n")
            process.stdin.flush()

    def total(self, key: str) -> int:
        return sum(counters.get(key, 0) for counters in self.latest)

    def line(self) -> str:
        keys = ("connected", "subscribed", "heads", "ran", "resent", "rejected", "refused", "lost")
        return ", ".join(f"{key} {self.total(key)}" for key in keys)

    def rss_mib(self) -> float:
        return sum(rss_mib(p.pid) for p in self.processes if p.poll() is None)

    def dead(self) -> list[int]:
        return [p.returncode for p in self.processes if p.poll() is not None]

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=10)


def wait_for(what: str, done: Any, workers: Workers, timeout: float, note: Any = lambda: "") -> float:
    """Seconds until done() is true, printing progress; raises TimeoutError after timeout."""
    start = time.perf_counter()
    last_print = start
    while not done():
        now = time.perf_counter()
        if workers.dead():
            raise RuntimeError(f"a simulator process exited ({workers.dead()}); see its simfleet-N.log")
        if now - start > timeout:
            raise TimeoutError(f"{what}: not done after {timeout:g} s ({workers.line()}{note()})")
        if now - last_print >= 5:
            print(f"  [{now - start:6.1f} s] {what}: {workers.line()}{note()}", flush=True)
            last_print = now
        time.sleep(0.1)
    return time.perf_counter() - start


def register(api: Any, count: int, online: int, threads: int) -> tuple[list[tuple[str, str]], float]:
    """(device id, password) of `count` new devices, the first `online` in GROUP, the rest in
    OFFLINE_GROUP, and the seconds it took: `POST /v1/devices` with MAX_BULK_DEVICES a request,
    `threads` requests at once."""
    from ota_bridge.api.schemas import MAX_BULK_DEVICES  # here: the simulator processes need none of the service

    ids = [f"sim-{i:06d}" for i in range(count)]
    batches = [ids[i:i + MAX_BULK_DEVICES] for i in range(0, count, MAX_BULK_DEVICES)]
    start = time.perf_counter()
    done = [0]

    def one(batch: list[str]) -> list[tuple[str, str]]:
        body = {"Devices": [{"DeviceId": d, "DeviceGroup": GROUP if int(d[4:]) < online else OFFLINE_GROUP}
                            for d in batch]}
        answer = api.ok("POST", "/v1/devices", body)["Devices"]
        done[0] += len(batch)
        if done[0] % 10_000 < len(batch):
            print(f"  registered {done[0]}/{count} ({time.perf_counter() - start:.1f} s)", flush=True)
        return [(d["DeviceId"], d["MqttPassword"]) for d in answer]

    with ThreadPoolExecutor(threads) as pool:
        devices = [device for batch in pool.map(one, batches) for device in batch]
    return devices, time.perf_counter() - start


def final_children(api: Any, job_id: str) -> int:
    result = api.ok("GET", f"/v1/job/{job_id}")["Result"]
    return sum(result.get(status, 0) for status in FINALS)


@dataclass
class Figures:
    lines: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.lines.append(text)
        print(text, flush=True)


def run(args: argparse.Namespace, workdir: Path) -> Figures:
    from tests.support.mosquitto import secure_mosquitto, start_mosquitto
    from tests.support.processes import Service

    figures = Figures()
    limit = raise_file_limit()  # the service inherits it too: the embedded broker holds a socket per device
    extra = BROKER_LINES
    with ExitStack() as stack:
        if args.broker == "embedded":  # in the service's process: no broker pid, its port is --mqtt-listen's
            broker, flags, name = None, (), "the embedded broker"
        elif args.accounts:
            (broker, flags), name = stack.enter_context(secure_mosquitto(workdir, extra)), "Mosquitto with accounts"
        else:
            broker, flags, name = stack.enter_context(start_mosquitto(workdir, extra)), (), "Mosquitto open"
        service = Service(workdir, mqtt_url=broker.url if broker else None, extra=tuple(flags))
        stack.callback(service.stop)
        service.start()
        port, broker_pid = (broker.port, broker.process.pid) if broker else (service.mqtt_port, None)
        figures.add(f"simfleet: {args.devices} devices, {args.processes} processes, {name}, "
                    f"open files limit {limit}")
        cpu = cpu_s(service.proc.pid)
        devices, took = register(service.api, args.devices, args.connect, args.register_threads)
        cpu = cpu_s(service.proc.pid) - cpu
        devices = devices[:args.connect]
        figures.add(f"registered {args.devices} devices in {took:.1f} s ({args.devices / took:.0f}/s), "
                    f"service CPU {cpu:.1f} s; service RSS {rss_mib(service.proc.pid):.0f} MiB")
        fleet.result(f"simfleet-{args.devices}-register", took, "s", devices=args.devices,
                     service_rss_mib=rss_mib(service.proc.pid), service_cpu_s=cpu)
        cpu = Cpu(service.proc.pid, broker_pid)
        workers = Workers(workdir, port, service.signing_key_file.read_text(), devices, args.processes)
        stack.callback(workers.stop)
        took = wait_for("connect", lambda: workers.total("subscribed") >= args.connect, workers, args.timeout)
        figures.add(f"connected and subscribed: {workers.total('connected')} devices in {took:.1f} s "
                    f"({args.connect / took:.0f}/s); service RSS {rss_mib(service.proc.pid):.0f} MiB, "
                    + (f"Mosquitto {rss_mib(broker_pid):.0f} MiB, " if broker_pid else "")
                    + f"simulators {workers.rss_mib():.0f} MiB; "
                    f"CPU {cpu.since()}")
        if args.idle:
            time.sleep(args.idle)
            figures.add(f"idle {args.idle:g} s, {workers.total('connected') - workers.total('lost')} devices "
                        f"connected: CPU {cpu.since(args.idle)}; service RSS {rss_mib(service.proc.pid):.0f} MiB")
        workflow_id = service.api.workflow("true", name="simfleet")
        for n in range(args.jobs):
            group_job(figures, service, workflow_id, n, workers, args)
            figures.add(f"  CPU for job {n + 1}: {cpu.since()}")
        if args.restart:
            restart(figures, service, workers, args, broker.port if broker and not args.accounts else None)
        time.sleep(2 * REPORT_SECONDS)  # the simulators report their counters once a second: the summary has their last
        if broker:
            dropped = f"Mosquitto logged {broker.log_text().count(DROPPED)} times that it dropped messages for a client"
        else:
            dropped = f"the embedded broker disconnected {service.log().count(SILENT)} clients as silent"
        figures.add(f"summary: {workers.line()}; simulators {workers.rss_mib():.0f} MiB; {dropped}")
    return figures


class Cpu:
    """The CPU seconds the service and Mosquitto (if any) used since the last look."""

    def __init__(self, service_pid: int, broker_pid: int | None) -> None:
        from stack import cpu_seconds

        self.pids, self.cpu_seconds = (service_pid, broker_pid), cpu_seconds
        self.last = [cpu_seconds(pid) for pid in self.pids]

    def since(self, seconds: float | None = None) -> str:
        now = [self.cpu_seconds(pid) for pid in self.pids]
        used, self.last = [b - a for a, b in zip(self.last, now, strict=True)], now
        share = (lambda s: f" ({s / seconds:.0%} of a core)") if seconds else (lambda s: "")
        text = f"service {used[0]:.1f} s{share(used[0])}"
        return text + (f", Mosquitto {used[1]:.1f} s{share(used[1])}" if self.pids[1] else "")


def group_job(figures: Figures, service: Any, workflow_id: str, n: int, workers: Workers,
              args: argparse.Namespace) -> None:
    """One group job (`true`) to every device: POST until every child is final."""
    cpu = cpu_s(service.proc.pid)
    start = time.perf_counter()
    job_id = service.api.submit(workflow_id, f"simfleet-{n}", DeviceGroup=GROUP)
    posted = time.perf_counter() - start
    took = posted + wait_for(f"job {n + 1}", lambda: final_children(service.api, job_id) >= args.connect,
                             workers, args.timeout)
    cpu = cpu_s(service.proc.pid) - cpu
    figures.add(f"group job {n + 1} (`true`): POST {posted:.2f} s, POST until all {args.connect} children final "
                f"{took:.2f} s ({args.connect / took:.0f} children/s), service CPU {cpu:.1f} s; service RSS "
                f"{rss_mib(service.proc.pid):.0f} MiB")
    fleet.result(f"simfleet-{args.devices}-job-{n + 1}", took, "s", devices=args.devices, connected=args.connect,
                 children_per_s=args.connect / took, service_rss_mib=rss_mib(service.proc.pid), service_cpu_s=cpu)


def restart(figures: Figures, service: Any, workers: Workers, args: argparse.Namespace, port: int | None) -> None:
    """Restart the service; time until every connected device verified a head it signed after the
    restart and (on an open broker, where a watcher may subscribe to every job topic) until the
    broker carried a new head for every registered device; then check that the broker holds, for
    every registered device, a retained head signed after the restart (RuntimeError if not)."""
    keys = job_signature.parse_public_keys(service.signing_key_file.read_text())
    heads = HeadCounter(port) if port is not None else None
    mark = time.time()
    workers.mark(mark)
    service.stop()
    start = time.perf_counter()
    service.start(timeout=args.timeout)
    up = time.perf_counter() - start
    try:
        wait_for("republish", lambda: workers.total("fresh") >= args.connect, workers, args.timeout)
        took = time.perf_counter() - start
        wait_for("republish to every registered device", lambda: heads is None or heads.count >= args.devices,
                 workers, args.timeout, lambda: f"; devices with a new head {heads.count if heads else '?'}")
        every = time.perf_counter() - start
        cpu = cpu_s(service.proc.pid)  # the new process: its start-up and the republish
    finally:
        if heads is not None:
            heads.stop()
    figures.add(f"service restart: up in {up:.1f} s, every connected device verified a republished head after "
                f"{took:.1f} s" + (f", the broker carried a new head for all {args.devices} devices after {every:.1f} s"
                                   if heads else "") + f"; the new service's CPU {cpu:.1f} s, "
                f"RSS {rss_mib(service.proc.pid):.0f} MiB")
    fleet.result(f"simfleet-{args.devices}-restart", took, "s", devices=args.devices, connected=args.connect,
                 every_head_s=every if heads else None, service_rss_mib=rss_mib(service.proc.pid),
                 service_cpu_s=cpu)
    if port is not None:
        fresh, problems = retained_heads(port, keys, mark, args.devices, args.timeout)
        if fresh < args.devices:
            raise RuntimeError(f"after the restart the broker holds a head signed since for {fresh} of "
                               f"{args.devices} registered devices: {'; '.join(problems[:5])}")
        figures.add(f"the broker holds a retained head, signed after the restart, verified and for its "
                    f"device, for all {args.devices} registered devices")


class HeadCounter:
    """A paho client subscribed to every device's job topic: counts the devices with a head
    published from now on (each device once)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.topics: set[str] = set()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="simfleet-head-counter")
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(Topics().all_devices(Topics.JOB), qos=1)
        if not subscribed.wait(30):
            raise RuntimeError("the head counter could not subscribe")

    @property
    def count(self) -> int:
        return len(self.topics)

    def _on_message(self, _client: object, _userdata: object, message: Any) -> None:
        if not message.retain:  # the retained heads it gets on subscribing are the old ones
            self.topics.add(message.topic)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_heads(port: int, keys: tuple[bytes, ...], mark: float, expected: int,
                   timeout: float) -> tuple[int, list[str]]:
    """(the devices whose retained head on the broker verifies with `keys`, is for the device of
    its topic and was issued at or after `mark`; what is wrong with the others, devices with no
    retained head included). Reads the retained heads with a new subscriber, until it has
    `expected` of them or none came for RETAINED_QUIET_SECONDS."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    held: dict[str, bytes] = {}
    last = [time.monotonic()]

    def on_message(_client: object, _userdata: object, message: Any) -> None:
        if message.retain:
            held[message.topic] = message.payload
            last[0] = time.monotonic()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="simfleet-retained-heads")
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    topics = Topics()
    try:
        client.subscribe(topics.all_devices(Topics.JOB), qos=0)
        deadline = time.monotonic() + timeout
        while (len(held) < expected and time.monotonic() - last[0] < RETAINED_QUIET_SECONDS
               and time.monotonic() < deadline):
            time.sleep(0.2)
    finally:
        client.disconnect()
        client.loop_stop()
    fresh, problems = 0, []
    for i in range(expected):
        device_id = f"sim-{i:06d}"
        payload = held.get(topics.job(device_id))
        if not payload:
            problems.append(f"{device_id}: no retained head")
            continue
        try:
            head = parse_head(payload, protocol.DEFAULT_TIMEOUT_SECONDS)
        except MessageError as e:
            problems.append(f"{device_id}: {e}")
            continue
        problem = job_signature.signature_problem(head.signature, head.signed_content, keys)
        if problem is None and head.device_id != device_id:
            problem = f"the head is for {head.device_id}"
        if problem is None and (head.issued_at is None or head.issued_at.timestamp() < mark):
            problem = f"issued at {head.issued_at}, before the restart"
        if problem is None:
            fresh += 1
        else:
            problems.append(f"{device_id}: {problem}")
    return fresh, problems


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--connect", type=int, help="connect only the first M devices (default: all)")
    parser.add_argument("--processes", type=int, default=2, help="simulator processes (one event loop each)")
    parser.add_argument("--jobs", type=int, default=1, help="group jobs (`true`) submitted one after another")
    parser.add_argument("--restart", action="store_true", help="then restart the service and time the republish")
    parser.add_argument("--broker", choices=("mosquitto", "embedded"), default="mosquitto",
                        help="the service's own broker (embedded) or a Mosquitto it starts (the default)")
    parser.add_argument("--idle", type=float, default=0,
                        help="after connecting, hold the fleet idle this many seconds and give the CPU used")
    parser.add_argument("--accounts", action="store_true", help="Mosquitto as shipped, accounts via --mosquitto-dir")
    parser.add_argument("--register-threads", type=int, default=REGISTER_THREADS,
                        help="registrations in flight (1 with --accounts while parallel ones may fail there)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds each phase may take")
    args = parser.parse_args()
    args.connect = min(args.connect or args.devices, args.devices)
    if args.accounts and args.broker == "embedded":
        parser.error("--accounts is for Mosquitto (the embedded broker always checks logins)")
    if args.restart and args.broker == "embedded":  # the broker restarts with the service
        parser.error("--restart is for Mosquitto: the simulated devices do not reconnect")
    with tempfile.TemporaryDirectory(prefix="ota-simfleet-") as workdir:
        try:
            run(args, Path(workdir))
        except (TimeoutError, RuntimeError) as e:
            print(f"simfleet: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
