"""Registering N devices through POST /v1/devices, as a ratio of hashing plus inserting them raw.

    .venv/bin/python bench/register.py [--devices 10000] [--batch 1000] [--broker embedded,files,dynsec]

Raw limit, in the same run: N new secrets hashed with PBKDF2 (the service's own hash_password, one
after the other) and inserted with one sqlite3 executemany in one transaction. The service: a
fresh one per broker mode, N devices posted in batches of --batch, one request after another.
Modes: `embedded` (the service's own broker asks the database), `files` (Mosquitto with
--mosquitto-dir: one rewrite of the password file and a SIGHUP per request) and `dynsec`
(Mosquitto's dynamic security plugin: a client and a role per device, over MQTT; give it a
--batch of 200 or so past a thousand devices, since each of its commands costs time in proportion
to the accounts it holds and a request must answer within the client's 30 s).
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from fleet import result, timed  # first: puts the repo on sys.path

from ota_bridge import credentials
from tests.support.mosquitto import secure_mosquitto
from tests.support.processes import Service

MODES = ("embedded", "files", "dynsec")


def raw(count: int, workdir: Path) -> float:
    """PBKDF2 for each device, then one executemany, one transaction: seconds."""
    start = time.perf_counter()
    rows = [(f"raw-{i:06d}", credentials.hash_password(credentials.new_secret())) for i in range(count)]
    with sqlite3.connect(workdir / "raw.db") as db:
        db.execute("CREATE TABLE device (device_id TEXT PRIMARY KEY, password_hash TEXT NOT NULL)")
        db.executemany("INSERT INTO device VALUES (?, ?)", rows)
    return time.perf_counter() - start


def through_service(mode: str, count: int, batch: int, workdir: Path) -> float:
    with ExitStack() as stack:
        url, extra = None, ()
        if mode == "files":
            broker, extra = stack.enter_context(secure_mosquitto(workdir))
            url = broker.url
        elif mode == "dynsec":
            from tests.support.mosquitto import dynsec_mosquitto
            broker, extra = stack.enter_context(dynsec_mosquitto(workdir))
            url = broker.url
        service = Service(workdir, mqtt_url=url, extra=extra)
        service.start()
        stack.callback(service.stop)
        api = service.api
        bodies = [{"Devices": [{"DeviceId": f"dev-{i:06d}"} for i in range(start, min(start + batch, count))]}
                  for start in range(0, count, batch)]
        each = [timed(lambda body=body: api.request("POST", "/v1/devices", body)) for body in bodies]
        bad = [a.body for _, a in each if a.status != 201]
        if bad:
            raise SystemExit(f"[{mode}] registration failed: {bad[0]}")
        print(f"[{mode}] first batch {each[0][0]:.2f} s, last batch {each[-1][0]:.2f} s", flush=True)
        return sum(seconds for seconds, _ in each)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--broker", default="embedded,files,dynsec",
                        help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ota-bench-register-") as tmp:
        limit = raw(args.devices, Path(tmp))
        print(f"raw:        {args.devices} devices in {limit:.2f} s (PBKDF2 one by one + sqlite3 executemany)",
              flush=True)
        for mode in args.broker.split(","):
            workdir = Path(tmp) / mode
            workdir.mkdir()
            seconds = through_service(mode, args.devices, args.batch, workdir)
            print(f"[{mode}] {args.devices} devices in {seconds:.2f} s through POST /v1/devices "
                  f"(batches of {args.batch}); raw / service = {limit / seconds:.2f}", flush=True)
            result(f"register-{mode}", seconds, "s", limit, limit / seconds, "ratio >= 0.8", devices=args.devices,
                   batch=args.batch)


if __name__ == "__main__":
    main()
