"""Database faults: lost connections, an outage, a full disk; the service recovers by itself and says so.

PostgreSQL tests get a database of their own (tests/support/databases.py) and end only their own
connections (pg_terminate_backend on that database); an outage is a TCP proxy between the service
and PostgreSQL that the test cuts (tests/support/tcp_proxy.py). The machine's PostgreSQL is never
restarted.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from ota_bridge.errors import StoreUnavailable
from ota_bridge.models import APPLICATION_NAME, Workflow
from ota_bridge.store import Store, idempotent, workflows, write_transaction
from tests.conftest import Launcher
from tests.support.databases import DEFAULT_POSTGRES, fresh_postgres
from tests.support.mosquitto import start_mosquitto
from tests.support.processes import REPO, Api, wait_until
from tests.support.tcp_proxy import TcpProxy, tcp_proxy

FINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED", "INTERRUPTED", "REJECTED"}


def terminate_service_connections(url: str, wait: bool = True) -> int:
    """pg_terminate_backend on the service's connections to this test's database; how many it ended.

    With wait, returns once those backends are gone (pg_terminate_backend only signals them).
    """
    import psycopg2

    admin = psycopg2.connect(os.environ.get("OTA_TEST_POSTGRES_URL", DEFAULT_POSTGRES), connect_timeout=5)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                        (urlsplit(url).path.lstrip("/"), APPLICATION_NAME))
            pids = [pid for (pid,) in cur.fetchall()]
            cur.execute("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM unnest(%s::int[]) AS pid",
                        (pids,))
            ended = cur.fetchone()[0]
            if wait:
                wait_until(lambda: not _alive(cur, pids), 10, "the terminated backends to exit")
            return ended
    finally:
        admin.close()


def _alive(cur: Any, pids: list[int]) -> bool:
    cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
    return cur.fetchone()[0] > 0


def through(proxy: TcpProxy, url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))


@pytest.fixture
def postgres() -> Iterator[str]:
    with fresh_postgres() as url:
        yield url


# --- the store ------------------------------------------------------------------------------


@pytest.mark.postgres
def test_the_store_reconnects_and_runs_again_only_what_cannot_write_twice(postgres: str) -> None:
    store = Store(postgres)
    doubts: list[int] = []
    store.on_doubt = lambda: doubts.append(1)
    try:
        # Closed while idle (a restart, a failover, an idle timeout): the next calls just work.
        assert terminate_service_connections(postgres) == 1
        assert store.call_sync(workflows.list_workflows) == []
        assert terminate_service_connections(postgres) == 1
        store.call_sync(workflows.create_workflow, "idle", "true", None, False)
        assert terminate_service_connections(postgres, wait=False) == 1  # the call may meet the closing
        store.call_sync(workflows.create_workflow, "racing", "true", None, False)

        # Lost inside a transaction, before its COMMIT: the database rolled it back; it runs again, once.
        runs: list[int] = []

        def lost_midway() -> None:
            runs.append(1)
            with write_transaction():
                Workflow.create(workflow_id=f"midway-{len(runs)}", name="x", command="true")
                if len(runs) == 1:
                    terminate_service_connections(postgres, wait=False)
                    time.sleep(0.2)  # the server has closed the connection: the next statement fails
                Workflow.select().count()

        store.call_sync(lost_midway)
        assert len(runs) == 2

        # Lost with the COMMIT under way: what it did may be stored, so it runs again only if idempotent.
        attempts: list[int] = []

        def lost_at_commit(name: str) -> None:
            attempts.append(1)
            with write_transaction():
                Workflow.create(workflow_id=f"{name}-{len(attempts)}", name="x", command="true")
                if len(attempts) == 1:
                    terminate_service_connections(postgres, wait=False)
                    time.sleep(0.2)  # closed by the server before the COMMIT goes out

        with pytest.raises(StoreUnavailable, match="may or may not have been saved"):
            store.call_sync(lost_at_commit, "once")
        assert len(attempts) == 1 and len(doubts) == 1
        attempts.clear()
        store.call_sync(idempotent(lost_at_commit), "repeatable")
        assert len(attempts) == 2 and len(doubts) == 2
        ids = sorted(w.workflow_id for w in store.call_sync(workflows.list_workflows) if w.name == "x")
        assert ids == ["midway-2", "repeatable-2"]  # nothing half-written, nothing twice
    finally:
        store.close()


@pytest.mark.postgres
def test_readers_reconnect_by_themselves(postgres: str) -> None:
    store = Store(postgres)

    async def reads() -> None:
        await store.call(workflows.create_workflow, "w", "true", None, False)
        await asyncio.gather(*(store.read(workflows.list_workflows) for _ in range(8)))  # readers connect
        assert terminate_service_connections(postgres) >= 2  # the writer's and the readers'
        for _ in range(8):
            assert [w.name for w in await store.read(workflows.list_workflows)] == ["w"]

    try:
        asyncio.run(reads())
    finally:
        store.close()


# --- SQLite: a full disk --------------------------------------------------------------------

FULL_DISK = """
import asyncio, logging, resource, sys, uuid
from ota_bridge.errors import StoreUnavailable
from ota_bridge.models import Workflow
from ota_bridge.store import Store, write_transaction

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
store = Store(sys.argv[1])

def write():
    with write_transaction():
        for _ in range(5):
            Workflow.create(workflow_id=str(uuid.uuid4()), name="big", command="x" * 50_000)

async def main():
    await store.call(write)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))  # the disk is full
    try:
        for _ in range(20):
            await store.call(write)
        sys.exit("the file size limit never stopped a write")
    except StoreUnavailable as e:
        print("ANSWER", e.detail)
    print("HEALTH", await store.unavailable())
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # room again
    await store.call(write)
    print("HEALTH", await store.unavailable())

asyncio.run(main())
"""


def test_a_full_disk_is_logged_with_its_cause_and_the_file_and_the_store_recovers(tmp_path: Path) -> None:
    path = tmp_path / "ota-bridge.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", FULL_DISK, f"sqlite:///{path}"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    error = next(line for line in lines if line.startswith("ERROR"))
    assert f"write failed on the SQLite file {path}" in error, error
    assert "file size limit" in error and "cannot rollback" not in error, error
    answer = next(line for line in lines if line.startswith("ANSWER"))
    assert "file size limit" in answer and "cannot rollback" not in answer, answer
    health = [line for line in lines if line.startswith("HEALTH")]
    assert "a write failed" in health[0] and "file size limit" in health[0], health
    assert health[1] == "HEALTH None", health  # writes work again, and health says so


# --- a deployment with real agents ----------------------------------------------------------

DEVICES = [f"pg-{n}" for n in range(5)]
ROUNDS = 4


def answer(api: Api, path: str) -> Any:
    """GET path, waiting out a 503 (a call can meet two lost connections in a row)."""
    return wait_until(lambda: (r := api.request("GET", path)).status == 200 and r.body, 30, f"GET {path}")


def healthy(api: Api) -> bool:
    return Api(api.base, None).request("GET", "/v1/health").status == 200


def unhealthy_database(api: Api) -> str:
    health = Api(api.base, None).request("GET", "/v1/health")
    return health.body["Database"]["Detail"] if health.status == 503 else ""


def outage_seen(api: Api) -> bool:
    """The database is away: health says so (the broker is fine), and the API answers 503 with Retry-After."""
    health = Api(api.base, None).request("GET", "/v1/health")
    if health.status != 503 or health.body["Database"]["Status"] != "unavailable":
        return False
    assert health.body["Status"] == "unavailable" and health.body["Broker"]["Status"] == "ok", health.body
    jobs = api.request("GET", "/v1/job")
    return jobs.status == 503 and jobs.body["Error"] == "Database unavailable" and jobs.headers["Retry-After"] == "2"


@pytest.mark.postgres
def test_a_deployment_survives_terminated_connections_and_a_database_outage(launch: Launcher, tmp_path: Path,
                                                                            postgres: str) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    with tcp_proxy("127.0.0.1", urlsplit(postgres).port or 5432) as proxy:
        service = launch.service(database=through(proxy, postgres))
        pid, api = service.proc.pid, service.api
        for device in DEVICES:
            launch.agent(service, device, api.device(device, group="fleet"))
        log = f'"{runs}/$OTA_DEVICE_ID"'
        workflow = api.workflow(f'echo "$OTA_JOB_ID" >> {log}; sleep 0.7; echo "done $OTA_JOB_ID" >> {log}; '
                                f'echo "$OTA_JOB_ID"')
        jobs = [api.submit(workflow, DeviceGroup="fleet") for _ in range(ROUNDS)]

        stop, ended = threading.Event(), []
        terminator = threading.Thread(target=lambda: [ended.append(terminate_service_connections(postgres, False))
                                                      for _ in iter(lambda: stop.wait(0.3), True)], daemon=True)
        terminator.start()
        try:
            wait_until(lambda: answer(api, f"/v1/job/{jobs[0]}")["Result"]["SUCCEEDED"] > 0, 30, "a first result")
            proxy.cut()  # the database goes away (as in a restart or a failover), while devices report
            wait_until(lambda: outage_seen(api), 15, "health and the API to report the outage")
            time.sleep(2)
            proxy.restore()
            wait_until(lambda: healthy(api), 15, "the service to serve again once the database is back")
            proxy.freeze()  # the network drops everything: health must not hang with the store
            wait_until(lambda: "no answer within" in unhealthy_database(api), 15, "health to report a silent database")
            proxy.thaw()
            wait_until(lambda: healthy(api), 15, "the service to serve again once the network is back")
            for job in jobs:
                wait_until(lambda job=job: answer(api, f"/v1/job/{job}")["Status"] in FINAL, 60, f"job {job}")
        finally:
            stop.set()
            terminator.join()
        assert sum(ended) >= 3, f"the test ended too few connections: {ended}"
        assert service.running and service.proc.pid == pid, "the service must recover without a restart"
        check_every_child(api, jobs, runs)
        service.stop()  # before the proxy goes


def check_every_child(api: Api, jobs: list[str], runs: Path) -> None:
    """Each device: each job SUCCEEDED with its own output, ran once, in submission order, each after the last."""
    children = {job: {c["DeviceId"]: c for c in answer(api, f"/v1/job/{job}/childjobs")} for job in jobs}
    for device in DEVICES:
        mine = [children[job][device] for job in jobs]
        assert [c["Status"] for c in mine] == ["SUCCEEDED"] * ROUNDS, mine
        assert [c["Stdout"] for c in mine] == [c["JobId"] + "\n" for c in mine], "a result was lost or mixed up"
        expected = [line for c in mine for line in (c["JobId"], f"done {c['JobId']}")]
        assert (runs / device).read_text().splitlines() == expected, f"{device}: not once each, in order"


# --- health and the broker ------------------------------------------------------------------


@pytest.mark.mosquitto
def test_health_reports_the_broker_apart_from_the_database(launch: Launcher, tmp_path: Path) -> None:
    with start_mosquitto(tmp_path) as broker:
        service = launch.service(mqtt_url=broker.url)
        public = Api(service.base_url, None)
        ok = public.request("GET", "/v1/health")
        assert ok.status == 200 and ok.body["Status"] == "ok", ok.body
        assert ok.body["Database"]["Status"] == ok.body["Broker"]["Status"] == "ok" and ok.body["BrokerConnected"]
        ready = public.request("GET", "/readyz")
        assert ready.status == 200 and ready.body["Status"] == "ok", ready.body
        broker.stop()
        down = wait_until(lambda: (r := public.request("GET", "/readyz")).status == 503 and r, 15, "503 from /readyz")
        assert down.body["Status"] == "unavailable" and down.body["Broker"]["Status"] == "unavailable", down.body
        assert down.body["Database"]["Status"] == "ok" and down.body["BrokerConnected"] is False, down.body
        assert public.request("GET", "/v1/health").status == 503
        live = public.request("GET", "/livez")
        assert live.status == 200 and live.body == {"Status": "ok"}  # an outage is no reason to restart
        broker.start()
        wait_until(lambda: public.request("GET", "/v1/health").status == 200, 30, "the broker to count again")
