"""`GET /v1/job/{id}` under concurrent clients, against an aiohttp handler that returns a constant.

    .venv/bin/python bench/read_api.py [--clients 50] [--requests 4000] [--database sqlite|postgres] [--writes]
                                       [--jobs 1]

Starts the service (its embedded broker; SQLite, or a fresh PostgreSQL database), submits a job
for one registered device (--jobs N: N jobs, the GETs taking them in turn), and starts a second
process: a bare aiohttp server whose one handler returns the (first) job's JSON as a constant.
One aiohttp client in this process then sends `--requests` GETs from `--clients` concurrent
tasks (keep-alive, one connection each) to each server, after a warm-up, in five rounds that
alternate between them (so a change in the machine's load hits both); the figure is each one's
best requests per second and the ratio service / constant. With --writes, a thread submits jobs
back to back meanwhile (the reads then share the database with a busy writer; the constant
server's rounds share the machine with it). It also prints each server's CPU time per GET (from
/proc), which the machine's load moves least, and on PostgreSQL that of the server processes
serving the service's connections (same machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import aiohttp
from fleet import REPO, result  # first: puts the repo on sys.path

from tests.support.databases import database_url
from tests.support.mosquitto import free_port
from tests.support.processes import Service, wait_until

CONSTANT_SERVER = """
import sys
from aiohttp import web
body = sys.stdin.buffer.read()
async def handler(request):
    return web.Response(body=body, content_type="application/json")
app = web.Application()
app.router.add_get("/v1/job/{id}", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""
WARM_UP = 300
ROUNDS = 5


async def _compare(targets: list[tuple[list[str], dict[str, str], int]], clients: int, requests: int,
                   backends: Callable[[], list[int]]) -> tuple[list[float], list[float], float]:
    """Best requests per second of each (urls, taken in turn; headers, server pid): `requests` GETs from `clients`
    concurrent tasks, the targets taking turns round after round, so a change in the machine's load
    hits both; each server's CPU time per GET over all its rounds (what load moves least); and the
    CPU time per GET of the first target's database server processes (`backends`, after the warm-up)."""
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), headers=headers)
                for _, headers, _ in targets]
    try:
        for session, (urls, _, _) in zip(sessions, targets, strict=True):
            await _round(session, urls, clients, WARM_UP)
        database = backends()
        best, cpu, database_cpu = [0.0] * len(targets), [0.0] * len(targets), 0.0
        for _ in range(ROUNDS):
            for i, (session, (urls, _, pid)) in enumerate(zip(sessions, targets, strict=True)):
                before = _cpu_seconds([pid] + (database if i == 0 else []))
                best[i] = max(best[i], await _round(session, urls, clients, requests))
                after = _cpu_seconds([pid] + (database if i == 0 else []))
                cpu[i] += after[0] - before[0]
                database_cpu += after[1] - before[1]
        return best, [seconds / (ROUNDS * requests) for seconds in cpu], database_cpu / (ROUNDS * requests)
    finally:
        for session in sessions:
            await session.close()


async def _round(session: aiohttp.ClientSession, urls: list[str], clients: int, requests: int) -> float:
    left = [requests]

    async def client() -> None:
        while left[0] > 0:
            left[0] -= 1
            url = urls[left[0] % len(urls)]
            async with session.get(url) as response:
                await response.read()
                if response.status != 200:
                    raise SystemExit(f"GET {url} answered {response.status}")

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return requests / (time.perf_counter() - start)


def _cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """User + system CPU time, all threads, from /proc (Linux): of the first process, and of the
    others together (a process gone meanwhile counts as 0)."""
    seconds = []
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            seconds.append(0.0)
            continue
        seconds.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return seconds[0], sum(seconds[1:])


def _backends(url: str) -> Callable[[], list[int]]:
    """The pids of the PostgreSQL server processes serving the service's connections to its database
    (the server runs on this machine); none for SQLite (the service's own process reads it)."""
    def pids() -> list[int]:
        if not url.startswith("postgresql"):
            return []
        import psycopg2
        with psycopg2.connect(url) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                           "AND pid <> pg_backend_pid()")
            found = [pid for (pid,) in cursor.fetchall()]
        conn.close()
        return found
    return pids


def _writer(service: Service, workflow_id: str, device_id: str, stop: threading.Event) -> list[int]:
    count = [0]

    def run() -> None:
        while not stop.is_set():
            service.api.submit(workflow_id, "background", DeviceId=device_id)
            count[0] += 1

    threading.Thread(target=run, daemon=True).start()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--requests", type=int, default=4000, help="GETs per round (default 4000)")
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite",
                        help="sqlite (a temporary file) or postgres (a fresh database on the test server)")
    parser.add_argument("--writes", action="store_true", help="submit jobs back to back meanwhile")
    parser.add_argument("--jobs", type=int, default=1, help="jobs the GETs take in turn (default 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ota-bench-") as workdir, \
            database_url(args.database, Path(workdir) / "db") as url:
        service = Service(Path(workdir), database=url)
        service.start()
        constant = None
        try:
            api = service.api
            api.device("reader-0")
            workflow_id = api.workflow("true", name="read")
            job_ids = [api.submit(workflow_id, "read", DeviceId="reader-0") for _ in range(args.jobs)]
            job_id = job_ids[0]
            body = json.dumps(api.ok("GET", f"/v1/job/{job_id}")).encode()
            port = free_port()
            constant = subprocess.Popen([sys.executable, "-c", CONSTANT_SERVER, str(port)], stdin=subprocess.PIPE,
                                        cwd=REPO)
            constant.stdin.write(body)
            constant.stdin.close()
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: _answers(f"{base}/v1/job/x"), 10, "the constant server")
            stop = threading.Event()
            writes = _writer(service, workflow_id, "reader-0", stop) if args.writes else [0]
            headers = {"Authorization": f"Bearer {api.token}"}
            started = time.perf_counter()
            assert service.proc is not None
            (served, raw), (cpu, raw_cpu), database_cpu = asyncio.run(_compare(
                [([f"{service.base_url}/v1/job/{j}" for j in job_ids], headers, service.proc.pid),
                 ([f"{base}/v1/job/{j}" for j in job_ids], {}, constant.pid)],
                args.clients, args.requests, _backends(url)))
            stop.set()
            write_rate = writes[0] / (time.perf_counter() - started)
        finally:
            if constant is not None:
                constant.terminate()
                constant.wait(10)
            service.stop()
    print(f"GET /v1/job/{{id}} ({args.database}, {args.clients} clients, {args.jobs} job(s), "
          f"best of {ROUNDS} x {args.requests}): "
          f"{served:.0f} req/s" + (f" with {write_rate:.0f} job submits/s meanwhile" if args.writes else ""))
    print(f"constant aiohttp handler, same client:  {raw:.0f} req/s")
    print(f"ratio service / constant: {served / raw:.2f}")
    print(f"CPU per GET: service {cpu * 1e6:.0f} us, constant {raw_cpu * 1e6:.0f} us (constant / service "
          f"{raw_cpu / cpu:.2f}: the ratio a CPU-bound service would reach)")
    if args.database == "postgres":
        print(f"CPU per GET of the PostgreSQL server processes serving the service: {database_cpu * 1e6:.0f} us")
    result(f"read-api-{args.database}" + ("-writes" if args.writes else ""), served, "req/s", raw, served / raw,
           "ratio >= 0.5", clients=args.clients, jobs=args.jobs, submits_per_s=write_rate if args.writes else None,
           cpu_us_per_get=round(cpu * 1e6), constant_cpu_us_per_get=round(raw_cpu * 1e6),
           database_cpu_us_per_get=round(database_cpu * 1e6) if args.database == "postgres" else None)


def _answers(url: str) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    main()
