"""Job throughput with 1, 2 and 3 `ota-bridge serve` instances (cluster mode) on PostgreSQL and Mosquitto.

    .venv/bin/python bench/instances.py [--devices 500] [--jobs 3] [--instances 1,2,3] [--timeout 90]

For each instance count: a fresh PostgreSQL database (OTA_TEST_POSTGRES_URL, default the machine's
`test` database's server), one Mosquitto (ephemeral port), N instances with --instance-id, and one
paho client standing in for every device (as bench/fanout.py: IN_PROGRESS then SUCCEEDED for each
new head). Once every instance holds its share of the device buckets, K group jobs are submitted
round-robin through the N APIs and timed until every child is final. The raw limit: a bare QoS 1
publisher -> subscriber on the same broker, for as many messages as the job flow needs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import psycopg2
from fanout import MESSAGES_PER_CHILD, RAW_RUNS, Devices, final_children, raw_rate  # first: puts the repo on sys.path
from fleet import GROUP, register_fleet, result, timed

from agent.protocol import Key
from ota_bridge import signing
from ota_bridge.store.leases import BUCKETS
from tests.support.databases import fresh_postgres
from tests.support.mosquitto import start_mosquitto
from tests.support.processes import Api, Service, wait_until

POLL_SECONDS = 0.1  # how often the flow counts final children


class Fleet(Devices):
    """fanout.Devices, answering only job heads (an idle head names no job)."""

    def _answer(self, topic: str, payload: bytes) -> None:
        if payload and Key.JOB_ID in json.loads(payload):
            super()._answer(topic, payload)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_instances(workdir: Path, count: int, database: str, broker_url: str) -> list[Service]:
    """`count` instances in cluster mode; 0: one instance without --instance-id (the single-instance mode)."""
    services: list[Service] = []
    for n in range(max(count, 1)):
        home = workdir / f"instance-{n}"
        home.mkdir()
        cluster = ("--instance-id", f"i{n}") if count else ()
        service = Service(home, broker_url, database, (*cluster, "--log-level", "WARNING"))
        if services:  # one job-signing key for all
            service.data_dir.mkdir(mode=0o700)
            for key_file in signing.key_files(services[0].data_dir):
                shutil.copy2(key_file, service.data_dir / key_file.name)
        service.start()
        services.append(service)
    return services


def backend_pids(database: str) -> list[int]:
    """The PostgreSQL server processes serving the instances (on this machine)."""
    with psycopg2.connect(database) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                       "AND pid <> pg_backend_pid()")
        return [pid for (pid,) in cursor.fetchall()]


def balanced(database: str, count: int) -> bool:
    with psycopg2.connect(database) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT owner, count(*) FROM ota_bucket_lease WHERE owner IS NOT NULL AND expires > now() "
                       "GROUP BY owner")
        held = dict(cursor.fetchall())
    return len(held) == count and sum(held.values()) == BUCKETS


def one_run(workdir: Path, count: int, devices: int, jobs: int,
            timeout: float) -> tuple[float, int, float, list[float], float, float]:
    """(child jobs/s, children final, raw QoS 1 msgs/s, each instance's CPU share of the flow,
    the broker's, PostgreSQL's) with `count` instances."""
    with fresh_postgres() as database, start_mosquitto(workdir) as broker:
        services = start_instances(workdir, count, database, broker.url)
        try:
            token = (services[0].data_dir / "admin-token").read_text().strip()
            apis = [Api(s.base_url, token) for s in services]
            register_fleet(apis[0], devices)
            if count:
                wait_until(lambda: balanced(database, count), 30, "every instance to hold its share of the buckets")
            workflow_id = apis[0].workflow("true", name="bench")
            backends = backend_pids(database)
            pids = [s.proc.pid for s in services if s.proc is not None] + [broker.process.pid, *backends]
            before = [cpu_seconds(pid) for pid in pids]
            with Fleet(broker.port):
                took, done = timed(lambda: _flow(apis, workflow_id, jobs, devices * jobs, timeout))
            shares = [(cpu_seconds(pid) - b) / took for pid, b in zip(pids, before, strict=True)]
            raw = max(raw_rate(broker.port, devices * jobs * MESSAGES_PER_CHILD) for _ in range(RAW_RUNS))
            instances = len(pids) - len(backends) - 1
            return done / took, done, raw, shares[:instances], shares[instances], sum(shares[instances + 1:])
        finally:
            for service in services:
                service.stop()


def _flow(apis: list[Api], workflow_id: str, jobs: int, children: int, timeout: float) -> int:
    job_ids = [apis[i % len(apis)].submit(workflow_id, f"bench-{i}", DeviceGroup=GROUP) for i in range(jobs)]
    return _wait_children(apis[-1], job_ids, children, timeout)


def _wait_children(api: Api, job_ids: list[str], expected: int, timeout: float) -> int:
    """Poll until `expected` children are final or the timeout passes; returns how many are. (Polled, not a
    held GET: one instance hears of the others' writes only every WAIT_RECHECK_SECONDS.)"""
    deadline = time.monotonic() + timeout
    while (done := final_children(api, job_ids)) < expected and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=500, help="simulated devices in the group (default 500)")
    parser.add_argument("--jobs", type=int, default=3, help="group jobs submitted at once (default 3)")
    parser.add_argument("--instances", default="0,1,2,3",
                        help="instance counts to measure; 0 is one instance without cluster mode (default 0,1,2,3)")
    parser.add_argument("--timeout", type=float, default=90, help="seconds to wait for every child (default 90)")
    args = parser.parse_args()
    counts = [int(c) for c in args.instances.split(",")]
    rates: dict[int, float] = {}
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="ota-bench-") as workdir:
            started = time.monotonic()
            rate, done, raw, cpu, broker_cpu, pg_cpu = one_run(Path(workdir), count, args.devices, args.jobs,
                                                               args.timeout)
        rates[count] = rate
        late = "" if done >= args.devices * args.jobs else " (TIMED OUT)"
        print(f"{count or 'single'} instance(s): {done} of {args.devices * args.jobs} children final{late}, "
              f"{rate:.0f} child jobs/s; "
              f"raw QoS 1 {raw:.0f} msgs/s, ratio (jobs/s x {MESSAGES_PER_CHILD}) / raw "
              f"{rate * MESSAGES_PER_CHILD / raw:.3f}; CPU in the flow: instances "
              f"{', '.join(f'{c:.0%}' for c in cpu)}, Mosquitto {broker_cpu:.0%}, PostgreSQL {pg_cpu:.0%} "
              f"({time.monotonic() - started:.0f} s with set-up)", flush=True)
        result(f"instances-{count or 'single'}", rate, "child jobs/s", raw, rate * MESSAGES_PER_CHILD / raw,
               raw_unit="QoS 1 msgs/s", devices=args.devices, jobs=args.jobs, final=done)
    base = rates[counts[0]]
    print("speed-up over " + f"{counts[0]} instance(s): " +
          ", ".join(f"{c}: {rates[c] / base:.2f}x" for c in counts))


if __name__ == "__main__":
    main()
