"""A waves rollout against a plain group job of the same size: the release bookkeeping's cost.

    .venv/bin/python bench/rollout.py [--devices 10000] [--database sqlite|postgres]

No broker, no HTTP: the service's own store functions, on the store's thread, as the service
calls them. Both runs do the same device work, as the service does it: submit a group job over N
devices, read every device's queue as the publisher does before it publishes a head (batches of
500), store every device's SUCCEEDED report (batches of 500, as the inbox does) and read the
queues again. The rollout (Waves 1, 10, 50, 100 %, WaveSuccessPercent 100, AbortOn FAILED 10 %)
also holds every child at submission (`submit_with_queues`, which builds in the same transaction
the queue lists of the devices whose only pending job is the held child, as the API does: the
publisher reads the others'; none here) and is released by the release loop's rounds
(`release_due`, `active_rollouts`, `advance` until the rollout is done): the decision builds the
queue lists of the devices whose only pending job is the child it released (the Releaser
publishes them as they are: all of them here), the others' being read when they are released,
as the plain job's are at submission. Not counted, in either:
signing and publishing the messages (the dispatcher's; the rollout publishes each device's idle
head and queue list once more, when it is held). Times are CPU time, the work done whatever else
the machine runs: with SQLite this process's (all of the work is in it); with PostgreSQL this
process's plus that of the server process of the store's connection (its /proc/PID/schedstat, so a
server on this machine; else the wall clock, and the output says so). Not in that CPU time: the
disk's flush at a commit (a release round commits twice), the WAL writer, autovacuum. On a shared
machine the wall clock of 10,000 round trips moves with the load (a run's ratio went from 0.6 to
2.9 at load 9), so the wall clock's per-call ratio is printed beside, not recorded. Each run starts
on an emptied table (PostgreSQL: vacuumed too, not timed, so that no run reads the dead rows of the
runs before). Eleven pairs, interleaved, the order alternating (which one runs first changes the
other's time). Two figures:
- per pair: the median of the eleven pairs' ratios rollout / plain of the whole runs (a loaded
  machine slows one run of a pair and not the other), and the release bookkeeping alone (the
  release loop's rounds: `release_due`, `active_rollouts` and `advance`) as a share of the plain
  job's time;
- per store call (the steadier one, and the one `fleet.result` records): each store call's time
  summed per part (submission, queue reads, results, release loop), each part's median over the
  eleven runs, and rollout / plain of those medians' sums. The bench's own work between the calls
  is left out, and a part slowed in one run by the machine moves the median little.
Goal for both: at most 1.10.
"""

from __future__ import annotations

import os
import statistics
import time
from datetime import datetime, timedelta
from typing import Any, Callable, TypeVar

import fleet  # first: puts the repo on sys.path
from store_fanout import fleet_store, parse_args

from agent.protocol import JobStatus
from ota_bridge.models import ChildJob, GuardedPostgres, db
from ota_bridge.rollout_plan import parse
from ota_bridge.store import Store, jobs, queues, write_transaction
from ota_bridge.store import rollouts as held
from ota_bridge.store.updates import Update, record_device_messages

# SQLite runs in this process: its CPU time (every thread's) is the work done, whatever else the
# machine runs. PostgreSQL works in its own process: its CPU time is added (_server_cpu).
now = time.perf_counter
BATCH = 500  # the publisher's queue reads and the inbox's update batches (dispatch.BATCH)
RUNS = 11
T = TypeVar("T")
WAVES = {"Rollout": {"Waves": [1, 10, 50, 100], "WaveSuccessPercent": 100},
         "AbortOn": [{"Status": "FAILED", "ThresholdPercent": 10, "MinFinished": 10}]}


def _clear_jobs() -> None:
    with write_transaction():
        ChildJob.delete().execute()
    if isinstance(db.obj, GuardedPostgres):
        db.execute_sql("VACUUM child_job")  # no transaction: the dead rows of the run before go


def _server_cpu(store: Store) -> Callable[[], float] | None:
    """This process's CPU time plus that of the PostgreSQL server process behind the store's
    connection, if it runs on this machine (its schedstat's first field: ns on a CPU)."""
    pid = store.call_sync(lambda: db.execute_sql("SELECT pg_backend_pid()").fetchone()[0])
    path = f"/proc/{pid}/schedstat"
    if not os.access(path, os.R_OK):
        return None

    def cpu() -> float:
        with open(path) as f:
            return time.process_time() + int(f.read().split()[0]) / 1e9
    return cpu


PARTS = ("submission", "queue reads", "results", "release loop")  # what each store call is counted as


class Calls:
    """The time of each store call (CPU time with SQLite), summed per part: the bench's own work
    between the calls (building updates, loops) is not counted, so the figure moves less."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.parts = dict.fromkeys(PARTS, 0.0)
        self.wall = dict.fromkeys(PARTS, 0.0)  # the same, on the wall clock

    def __call__(self, part: str, fn: Callable[..., T], *args: Any) -> T:
        start, wall = now(), time.perf_counter()
        try:
            return self.store.call_sync(fn, *args)
        finally:
            self.parts[part] += now() - start
            self.wall[part] += time.perf_counter() - wall

    def total(self) -> float:
        return sum(self.parts.values())


def _run_devices(call: Calls, device_ids: list[str], known: list[queues.DeviceQueue] | None = None) -> None:
    """What the service does for these devices' heads: read their queues (but those `known`, built
    by the store call that changed them), store their results, read again."""
    built = {q.device_id: q for q in known or []}
    for i in range(0, len(device_ids), BATCH):
        batch = device_ids[i:i + BATCH]
        unread = [d for d in batch if d not in built]
        read = {q.device_id: q for q in call("queue reads", queues.device_queues, unread)} if unread else {}
        heads = [built.get(d) or read[d] for d in batch]
        updates = [Update(q.device_id, q.head.job_id, JobStatus.SUCCEEDED) for q in heads if q.head is not None]
        assert len(updates) == len(batch)
        call("results", record_device_messages, updates, [])
        call("queue reads", queues.device_queues, batch)


def plain(store: Store, workflow_id: str) -> tuple[float, Calls]:
    store.call_sync(_clear_jobs)
    call = Calls(store)
    start = now()
    job, device_ids = call("submission", jobs.submit_job, "plain", workflow_id, "DeviceGroup", "fan", None)
    _run_devices(call, device_ids)
    return now() - start, call


def rollout(store: Store, workflow_id: str) -> tuple[float, Calls, int]:
    """The waves rollout, to its end: its time, its store calls' and its release rounds."""
    store.call_sync(_clear_jobs)
    plan = parse(WAVES, "DeviceGroup")
    assert plan is not None
    clock = datetime(2026, 3, 14, 2, 0)
    call = Calls(store)
    start = now()
    submitted = call("submission", held.submit_with_queues, "waves", workflow_id, "DeviceGroup", "fan", None, plan)
    job, device_ids = submitted.job, submitted.device_ids
    known = {q.device_id for q in submitted.queues}  # the held children's queues, built by the submission
    unknown = [d for d in device_ids if d not in known]  # the publisher reads the others' (none here)
    for i in range(0, len(unknown), BATCH):
        call("queue reads", queues.device_queues, unknown[i:i + BATCH])
    rounds = 0
    while job.job_id in call("release loop", held.active_rollouts):
        rounds += 1
        clock += timedelta(seconds=1)
        call("release loop", held.release_due, clock)
        decided = call("release loop", held.advance, job.job_id, clock)
        _run_devices(call, decided.device_ids, decided.queues)
    elapsed = now() - start
    summary = store.call_sync(jobs.get_job, job.job_id)
    assert summary.counts == {JobStatus.SUCCEEDED.value: len(device_ids)}, summary.counts
    return elapsed, call, rounds


def _median_parts(calls: list[Calls], wall: bool = False) -> dict[str, float]:
    return {part: statistics.median((c.wall if wall else c.parts)[part] for c in calls) for part in PARTS}


def _print_parts(plain_calls: list[Calls], rollout_calls: list[Calls]) -> float:
    """Each part's median over the runs, per job, and rollout / plain of their sums: returns that ratio."""
    p, r = _median_parts(plain_calls), _median_parts(rollout_calls)
    for part in PARTS:
        print(f"  {part:<13} plain {p[part] * 1000:6.0f} ms   rollout {r[part] * 1000:6.0f} ms")
    ratio = sum(r.values()) / sum(p.values())
    print(f"  {'total':<13} plain {sum(p.values()) * 1000:6.0f} ms   rollout {sum(r.values()) * 1000:6.0f} ms: "
          f"ratio {ratio:.3f} (goal: at most 1.10)")
    return ratio


def _wall_ratio(plain_calls: list[Calls], rollout_calls: list[Calls]) -> float:
    """The per-call ratio on the wall clock (the same medians of parts)."""
    return sum(_median_parts(rollout_calls, True).values()) / sum(_median_parts(plain_calls, True).values())


def main() -> None:
    global now
    args = parse_args(__doc__)
    plain_runs, rollout_runs = [], []
    with fleet_store(args.database, args.devices) as (store, workflow_id):
        server = None if args.database == "sqlite" else _server_cpu(store)
        now = time.process_time if args.database == "sqlite" else server or time.perf_counter
        for i in range(RUNS):  # interleaved, so that a slower moment of the machine hits both
            if i % 2:
                rollout_runs.append(rollout(store, workflow_id))
                plain_runs.append(plain(store, workflow_id))
            else:
                plain_runs.append(plain(store, workflow_id))
                rollout_runs.append(rollout(store, workflow_id))
    plain_times = [t for t, _ in plain_runs]
    ratios = sorted(r[0] / p for r, p in zip(rollout_runs, plain_times, strict=True))
    shares = sorted(r[1].parts["release loop"] / p for r, p in zip(rollout_runs, plain_times, strict=True))
    best_plain, (best_rollout, best_calls, rounds) = min(plain_times), min(rollout_runs, key=lambda r: r[0])
    clock_name = "wall clock" if now is time.perf_counter else "CPU time" if server is None else \
        "CPU time, this process's and the server's"
    print(f"{args.devices} devices ({args.database}, {clock_name}): plain group job {best_plain * 1000:.0f} ms, "
          f"waves rollout {best_rollout * 1000:.0f} ms in {rounds} release rounds, of which the release loop "
          f"{best_calls.parts['release loop'] * 1000:.0f} ms (best of {RUNS})")
    print(f"ratios rollout / plain of the {RUNS} runs: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"ratio rollout / plain: {statistics.median(ratios):.3f} (median of the pairs; goal: at most 1.10); "
          f"release bookkeeping / plain: {statistics.median(shares):.3f}")
    print(f"the store calls' {clock_name}, each part's median over the {RUNS} runs:")
    plain_calls, rollout_calls = [c for _, c in plain_runs], [c for _, c, _ in rollout_runs]
    by_call = _print_parts(plain_calls, rollout_calls)
    wall = _wall_ratio(plain_calls, rollout_calls)
    if now is not time.perf_counter:
        print(f"the same on the wall clock: ratio {wall:.3f}")
    fleet.result(f"rollout-{args.database}", best_rollout * 1000, "ms", best_plain * 1000, by_call,
                 "ratio <= 1.1", raw_unit="ms (a plain group job)", devices=args.devices, release_rounds=rounds,
                 median_pair_ratio=round(statistics.median(ratios), 3), clock=clock_name,
                 wall_clock_ratio=round(wall, 3))


if __name__ == "__main__":
    main()
