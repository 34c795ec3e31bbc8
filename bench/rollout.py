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
(`release_due`, `active_rollouts`, `advance` until the rollout is done), each device's queue
being read when it is released, as the plain job's are at submission. Not counted, in either:
signing and publishing the messages (the dispatcher's; the rollout publishes each device's idle
head and queue list once more, when it is held). Times are this process's CPU time with SQLite
(all of the work is in it) and the wall clock with PostgreSQL. Seven pairs, interleaved, the
order alternating (which one runs first changes the other's time); the figures are the medians
of the seven pairs' ratios (a loaded machine slows one run of a pair and not the other):
rollout / plain in all (goal: at most 1.10), and the release bookkeeping alone (the release
loop's rounds: `release_due`, `active_rollouts` and `advance`) as a share of the plain job's time.
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timedelta

import fleet  # first: puts the repo on sys.path
from store_fanout import fleet_store, parse_args

from agent.protocol import JobStatus
from ota_bridge.models import ChildJob
from ota_bridge.rollout_plan import parse
from ota_bridge.store import Store, jobs, queues, write_transaction
from ota_bridge.store import rollouts as held
from ota_bridge.store.updates import Update, record_device_messages

# SQLite runs in this process: its CPU time (every thread's) is the work done, whatever else the
# machine runs. PostgreSQL works in its own processes: there the wall clock.
now = time.perf_counter
BATCH = 500  # the publisher's queue reads and the inbox's update batches (dispatch.BATCH)
RUNS = 7
WAVES = {"Rollout": {"Waves": [1, 10, 50, 100], "WaveSuccessPercent": 100},
         "AbortOn": [{"Status": "FAILED", "ThresholdPercent": 10, "MinFinished": 10}]}


def _clear_jobs() -> None:
    with write_transaction():
        ChildJob.delete().execute()


def _run_devices(store: Store, job_id: str, device_ids: list[str]) -> None:
    """What the service does for these devices' heads: read their queues, store their results, read again."""
    for i in range(0, len(device_ids), BATCH):
        batch = device_ids[i:i + BATCH]
        heads = store.call_sync(queues.device_queues, batch)
        updates = [Update(q.device_id, q.head.job_id, JobStatus.SUCCEEDED) for q in heads if q.head is not None]
        assert len(updates) == len(batch)
        store.call_sync(record_device_messages, updates, [])
        store.call_sync(queues.device_queues, batch)


def plain(store: Store, workflow_id: str) -> float:
    store.call_sync(_clear_jobs)
    start = now()
    job, device_ids = store.call_sync(jobs.submit_job, "plain", workflow_id, "DeviceGroup", "fan", None)
    _run_devices(store, job.job_id, device_ids)
    return now() - start


def rollout(store: Store, workflow_id: str) -> tuple[float, float, int]:
    """The waves rollout, to its end: its time, the release loop's part of it, and its rounds."""
    store.call_sync(_clear_jobs)
    plan = parse(WAVES, "DeviceGroup")
    assert plan is not None
    clock = datetime(2026, 3, 14, 2, 0)
    start = now()
    submitted = store.call_sync(held.submit_with_queues, "waves", workflow_id, "DeviceGroup", "fan", None, plan)
    job, device_ids = submitted.job, submitted.device_ids
    known = {q.device_id for q in submitted.queues}  # the held children's queues, built by the submission
    unknown = [d for d in device_ids if d not in known]  # the publisher reads the others' (none here)
    for i in range(0, len(unknown), BATCH):
        store.call_sync(queues.device_queues, unknown[i:i + BATCH])
    rounds, bookkeeping = 0, 0.0
    while True:
        decided = now()
        if job.job_id not in store.call_sync(held.active_rollouts):
            bookkeeping += now() - decided
            break
        rounds += 1
        clock += timedelta(seconds=1)
        store.call_sync(held.release_due, clock)
        released = store.call_sync(held.advance, job.job_id, clock).device_ids
        bookkeeping += now() - decided
        _run_devices(store, job.job_id, released)
    elapsed = now() - start
    summary = store.call_sync(jobs.get_job, job.job_id)
    assert summary.counts == {JobStatus.SUCCEEDED.value: len(device_ids)}, summary.counts
    return elapsed, bookkeeping, rounds


def main() -> None:
    global now
    args = parse_args(__doc__)
    if args.database == "sqlite":
        now = time.process_time
    plain_times, rollout_runs = [], []
    with fleet_store(args.database, args.devices) as (store, workflow_id):
        for i in range(RUNS):  # interleaved, so that a slower moment of the machine hits both
            if i % 2:
                rollout_runs.append(rollout(store, workflow_id))
                plain_times.append(plain(store, workflow_id))
            else:
                plain_times.append(plain(store, workflow_id))
                rollout_runs.append(rollout(store, workflow_id))
    ratios = sorted(r[0] / p for r, p in zip(rollout_runs, plain_times, strict=True))
    shares = sorted(r[1] / p for r, p in zip(rollout_runs, plain_times, strict=True))
    best_plain, (best_rollout, bookkeeping, rounds) = min(plain_times), min(rollout_runs)
    print(f"{args.devices} devices ({args.database}, {'CPU time' if now is time.process_time else 'wall clock'}): "
          f"plain group job {best_plain * 1000:.0f} ms, "
          f"waves rollout {best_rollout * 1000:.0f} ms in {rounds} release rounds, of which the release loop "
          f"{bookkeeping * 1000:.0f} ms (best of {RUNS})")
    print(f"ratios rollout / plain of the {RUNS} runs: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"ratio rollout / plain: {statistics.median(ratios):.3f} (median; goal: at most 1.10); "
          f"release bookkeeping / plain: {statistics.median(shares):.3f}")
    fleet.result(f"rollout-{args.database}", best_rollout * 1000, "ms", best_plain * 1000, statistics.median(ratios),
                 "ratio <= 1.1", raw_unit="ms (a plain group job)", devices=args.devices, release_rounds=rounds)


if __name__ == "__main__":
    main()
