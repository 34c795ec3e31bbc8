"""Does `POST /v1/job` grow with the registry, or only with the job's target?

    .venv/bin/python bench/post_registry.py [--registered 1000,10011,100000] [--database sqlite|postgres|both]
        [--broker embedded|mosquitto] [--targets single,group10,group10k] [--reps 8]

For each registry size, a fresh database (a SQLite file, or a fresh PostgreSQL database on the
test server) gets its devices inserted directly (one shared password hash: hashing is
registration's cost): devices 0-9 in the group `g10`, 10-10,009 in `g10k` (when there are that
many and one more), the rest in no group, as the 90,000 offline devices of bench/simfleet.py's
100,000 run. Then:

- store: `jobs.submit_job_with_queues` as the POST calls it (the queues of up to 100 targets
  read in the same transaction), timed on the store's thread (wall and thread CPU), median of
  --reps, for one device (the last registered, in no group), `g10` and `g10k`;
- HTTP: the service (its embedded broker, or Mosquitto) started on that database and left to
  finish its start-up republish (every registered device's head); then `POST /v1/job` for the same three targets,
  --reps times each, each timed at the client, with the service's CPU (/proc) over the request
  and over the request and its publishing (until the service is idle again): medians of the
  times, means of the CPU (which /proc counts in 10 ms ticks).

The figures are per target and registry size; the RESULT figure is the POST's time at the largest
registry, its raw the same target's at the smallest, the ratio the one over the other: about 1
where the POST costs what its target costs (the wall times move by a third between runs on a
shared machine; the store's thread CPU is the steady figure). tests/test_submission_plans.py
checks the reason: every read of the POST's store call goes through an index. Jobs accumulate
(nothing runs them): the same sequence at every size.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fleet import result  # first: puts the repo on sys.path
from stack import cpu_seconds

from ota_bridge.models import Device
from ota_bridge.store import Store, jobs, workflows, write_transaction
from tests.support.databases import database_url
from tests.support.mosquitto import start_mosquitto
from tests.support.processes import Service

SMALL, LARGE = 10, 10_000
IDLE_CPU_S = 0.02  # the service is idle when it used at most this much CPU in IDLE_WINDOW_S
IDLE_WINDOW_S = 0.5


def device_id(i: int) -> str:
    return f"reg-{i:06d}"


def _group_of(i: int, registered: int) -> str | None:
    """g10, g10k (if all of it fits before the last device), or none (the last device: the single target)."""
    if i == registered - 1:
        return None
    if i < SMALL:
        return "g10"
    return "g10k" if i < SMALL + LARGE else None


def _insert_devices(count: int) -> None:
    with write_transaction():
        rows = [{"device_id": device_id(i), "group": _group_of(i, count), "password_hash": "x"}
                for i in range(count)]
        for start in range(0, count, 500):
            Device.insert_many(rows[start:start + 500]).execute()


TARGETS = ("single", "group10", "group10k")
_only: tuple[str, ...] = TARGETS  # --targets


def targets(registered: int) -> dict[str, tuple[str, str]]:
    """name -> (target field, value): one device in no group, the 10-device group, the 10,000 one if there."""
    chosen = {"single": ("DeviceId", device_id(registered - 1)), "group10": ("DeviceGroup", "g10")}
    if registered >= SMALL + LARGE + 1:
        chosen["group10k"] = ("DeviceGroup", "g10k")
    return {name: target for name, target in chosen.items() if name in _only}


def _timed_submit(workflow_id: str, field: str, value: str) -> tuple[float, float]:
    """On the store's thread: (wall, thread CPU) seconds of the POST's store call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    jobs.submit_job_with_queues(None, workflow_id, field, value, None, jobs.READ_WITH_SUBMISSION)
    return time.perf_counter() - wall, time.thread_time() - cpu


def store_side(url: str, registered: int, reps: int) -> tuple[str, dict[str, dict[str, float]]]:
    """Insert the devices, then time the POST's store call per target. Returns the workflow id and
    {target: {"wall_ms", "cpu_ms"}} (medians)."""
    store = Store(url)
    try:
        store.call_sync(_insert_devices, registered)
        workflow_id = store.call_sync(workflows.create_workflow, "bench", "true", None, False).workflow_id
        figures = {}
        for name, (field, value) in targets(registered).items():
            runs = [store.call_sync(_timed_submit, workflow_id, field, value) for _ in range(reps)]
            figures[name] = {"wall_ms": statistics.median(r[0] for r in runs) * 1000,
                             "cpu_ms": statistics.median(r[1] for r in runs) * 1000}
        return workflow_id, figures
    finally:
        store.close()


def wait_idle(pid: int, timeout: float = 600) -> float:
    """Wait until the process used at most IDLE_CPU_S of CPU over IDLE_WINDOW_S; the seconds waited."""
    start = time.perf_counter()
    last = cpu_seconds(pid)
    while time.perf_counter() - start < timeout:
        time.sleep(IDLE_WINDOW_S)
        now = cpu_seconds(pid)
        if now - last <= IDLE_CPU_S:
            return time.perf_counter() - start
        last = now
    raise TimeoutError(f"the service was still busy after {timeout} s")


def http_side(service: Service, workflow_id: str, registered: int, reps: int) -> dict[str, dict[str, float]]:
    """POST /v1/job per target, reps times, each after the service is idle. {target: medians}."""
    pid = service.proc.pid
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in targets(registered)}
    for _ in range(reps):
        for name, (field, value) in targets(registered).items():
            wait_idle(pid)
            cpu = cpu_seconds(pid)
            start = time.perf_counter()
            service.api.submit(workflow_id, "post-registry", **{field: value})
            took = time.perf_counter() - start
            cpu_post = cpu_seconds(pid) - cpu
            wait_idle(pid)
            runs[name].append((took, cpu_post, cpu_seconds(pid) - cpu))
    return {name: {"post_ms": statistics.median(r[0] for r in rows) * 1000,
                   "post_cpu_ms": statistics.mean(r[1] for r in rows) * 1000,  # means: /proc counts 10 ms ticks
                   "with_publish_cpu_ms": statistics.mean(r[2] for r in rows) * 1000}
            for name, rows in runs.items()}


def one_size(database: str, registered: int, reps: int, broker: str) -> dict[str, dict[str, float]]:
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ota-bench-")))
        url = stack.enter_context(database_url(database, workdir))
        workflow_id, figures = store_side(url, registered, reps)
        mosquitto = stack.enter_context(start_mosquitto(workdir)) if broker == "mosquitto" else None
        service = Service(workdir, database=url, mqtt_url=mosquitto.url if mosquitto else None,
                          extra=("--new-signing-key",))  # the devices were made before its key
        try:
            service.start(timeout=120)
            cpu = cpu_seconds(service.proc.pid)
            waited = wait_idle(service.proc.pid)
            print(f"  {database}, {registered} registered: start-up republish {waited:.1f} s, "
                  f"CPU {cpu_seconds(service.proc.pid) - cpu:.1f} s after ready", flush=True)
            for name, http in http_side(service, workflow_id, registered, reps).items():
                figures[name].update(http)
        finally:
            service.stop()
    return figures


def report(database: str, by_size: dict[int, dict[str, dict[str, float]]]) -> None:
    sizes = sorted(by_size)
    for name in targets(max(sizes)):
        having = [n for n in sizes if name in by_size[n]]
        for key in ("cpu_ms", "wall_ms", "post_ms", "post_cpu_ms", "with_publish_cpu_ms"):
            line = ", ".join(f"{n}: {by_size[n][name][key]:.1f}" for n in having)
            print(f"{database} {name} {key} by registered devices: {line}")
        small, large = by_size[having[0]][name], by_size[having[-1]][name]
        result(f"post-registry-{database}-{name}", large["post_ms"], "ms", small["post_ms"],
               large["post_ms"] / small["post_ms"], "ratio <= 2", registered=having,
               store_cpu_ms={n: round(by_size[n][name]["cpu_ms"], 2) for n in having},
               post_ms={n: round(by_size[n][name]["post_ms"], 2) for n in having},
               with_publish_cpu_ms={n: round(by_size[n][name]["with_publish_cpu_ms"], 1) for n in having})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registered", default="1000,10011,100000", help="registry sizes, comma-separated")
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"some of {','.join(TARGETS)}")
    parser.add_argument("--reps", type=int, default=8)
    args = parser.parse_args()
    global _only
    _only = tuple(args.targets.split(","))
    sizes = [int(s) for s in args.registered.split(",")]
    for database in ("sqlite", "postgres") if args.database == "both" else (args.database,):
        by_size: dict[int, Any] = {}
        for registered in sizes:
            by_size[registered] = one_size(database, registered, args.reps, args.broker)
        report(database, by_size)


if __name__ == "__main__":
    main()
