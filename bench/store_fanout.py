"""The store's part of a fan-out: a group job to N devices, submitted and read back as the publisher reads it.

    .venv/bin/python bench/store_fanout.py [--devices 10000] [--database URL]

No broker, no HTTP: the service's own store functions on a fresh SQLite file (or --database, a
fresh PostgreSQL database). N devices are inserted directly (one shared password hash: hashing is
registration's cost, not the fan-out's). The figure: `jobs.submit_job` for one group job over the
N devices, then `queues.device_queues` over them in batches of 500 (the publisher's batch), as
the service does before it publishes each head; best of 3. The raw limit, same run, same kind of
database: the driver alone inserting N child rows (ids made as the store makes them) in one
transaction (executemany) and reading them back with one SELECT.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

from fleet import result  # first: puts the repo on sys.path

from ota_bridge.models import ChildJob, Device, Job, db, now
from ota_bridge.store import Store, jobs, queues, workflows, write_transaction
from tests.support.databases import database_url

BATCH = 500  # what the publisher reads at a time (dispatch.BATCH)
RUNS = 3


def _insert_devices(count: int) -> None:
    with write_transaction():
        rows = [{"device_id": f"fan-{i:06d}", "group": "fan", "password_hash": "x"} for i in range(count)]
        for start in range(0, count, 500):
            Device.insert_many(rows[start:start + 500]).execute()


def _service_side(store: Store, workflow_id: str, count: int) -> float:
    start = time.perf_counter()
    _job, device_ids = store.call_sync(jobs.submit_job, "fan", workflow_id, "DeviceGroup", "fan", None)
    for i in range(0, len(device_ids), BATCH):
        store.call_sync(queues.device_queues, device_ids[i:i + BATCH])
    assert len(device_ids) == count
    return time.perf_counter() - start


def _raw(count: int) -> float:
    """The driver alone: N child rows (new ids) inserted in one transaction, then read back in one SELECT."""
    parent = str(uuid.uuid4())
    Job.insert(job_id=parent, name="raw", workflow_id="raw", command="true", timeout_seconds=60,
               target_field="DeviceGroup", target_value="fan").execute()
    table, param = ChildJob._meta.table_name, db.obj.param
    columns = "job_id, parent_id, device_id, status, stdout, stderr, stdout_truncated, stderr_truncated, " \
              "finalized_by_service, updated, attempt"  # every NOT NULL column without a database default
    sql = f"INSERT INTO {table} ({columns}) VALUES ({', '.join([param] * 11)})"
    start = time.perf_counter()
    current = now()
    rows = [(str(uuid.uuid4()), parent, f"fan-{i:06d}", "QUEUED", "", "", False, False, False, current, 1)
            for i in range(count)]
    with write_transaction():
        db.obj.cursor().executemany(sql, rows)
    read = db.execute_sql(f"SELECT device_id, job_id, seq, status FROM {table} WHERE parent_id = {param} "
                          f"ORDER BY device_id", (parent,)).fetchall()
    assert len(read) == count
    return time.perf_counter() - start


def parse_args(doc: str) -> argparse.Namespace:
    """--devices and --database, as every store benchmark takes them."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10000, help="devices in the group (default 10000)")
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite",
                        help="sqlite (a temporary file) or postgres (a fresh database on the test server)")
    return parser.parse_args()


@contextlib.contextmanager
def fleet_store(database: str, devices: int) -> Iterator[tuple[Store, str]]:
    """A store on a fresh database with `devices` devices in the group 'fan', and a workflow's id."""
    with tempfile.TemporaryDirectory(prefix="ota-bench-") as workdir, database_url(database, Path(workdir)) as url:
        store = Store(url)
        try:
            store.call_sync(_insert_devices, devices)
            yield store, store.call_sync(workflows.create_workflow, "fan", "true", None, False).workflow_id
        finally:
            store.close()


def main() -> None:
    args = parse_args(__doc__)
    with fleet_store(args.database, args.devices) as (store, workflow_id):
        service = min(_service_side(store, workflow_id, args.devices) for _ in range(RUNS))
        raw = min(store.call_sync(_raw, args.devices) for _ in range(RUNS))
    print(f"store fan-out to {args.devices} devices ({args.database}): submit + read every queue "
          f"{service * 1000:.0f} ms (best of {RUNS})")
    print(f"raw: the driver's executemany of {args.devices} rows + one SELECT: {raw * 1000:.0f} ms")
    print(f"ratio store / raw: {service / raw:.2f}")
    result(f"store-fanout-{args.database}", service * 1000, "ms", raw * 1000, service / raw, "ratio <= 1.5",
           devices=args.devices)


if __name__ == "__main__":
    main()
