"""Three `ota-bridge serve` instances on one PostgreSQL database and one Mosquitto (cluster mode).

Jobs go in through all three APIs; one instance is killed with SIGKILL while jobs run. Every child
job must end SUCCEEDED, run exactly once, in submission order on each device (the devices' run logs).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import time
from pathlib import Path
from typing import Mapping

import psycopg2
import pytest

from ota_bridge import settings, signing
from ota_bridge.errors import ConfigError
from ota_bridge.store import Store, leases
from ota_bridge.store.leases import BUCKETS, bucket_of

from .support.databases import fresh_postgres
from .support.mosquitto import start_mosquitto
from .support.processes import Agent, Api, Service, wait_until

PG = "postgresql://u@h:5432/db"
MQTT = "mqtt://u:p@h:1883"

INSTANCES = "abc"
DEVICES_PER_INSTANCE = 2
ROUNDS = 6
KILL_AFTER_ROUND = 3  # while the devices of the killed instance still have jobs queued


def parse(argv: list[str]) -> settings.Settings:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    return settings.resolve(parser.parse_args(argv), {})


@pytest.mark.parametrize(("argv", "needs"), [
    (["--mqtt-url", MQTT], "PostgreSQL"),
    (["--database", "sqlite:///x.db", "--mqtt-url", MQTT], "PostgreSQL"),
    (["--database", PG], "external broker"),
    (["--database", PG, "--mqtt-url", MQTT, "--mosquitto-dir", "/tmp/m"], "password file.*--mosquitto-dynsec"),
])
def test_cluster_mode_refuses_what_instances_cannot_share(argv: list[str], needs: str) -> None:
    with pytest.raises(ConfigError, match=needs) as error:
        parse(["--instance-id", "a", *argv])
    assert "\n" not in str(error.value)


def test_cluster_mode_settings() -> None:
    assert parse(["--instance-id", "web-1", "--database", PG, "--mqtt-url", MQTT]).instance_id == "web-1"
    assert parse([]).instance_id is None
    with_dynsec = parse(["--instance-id", "a", "--database", PG, "--mqtt-url", MQTT, "--mosquitto-dynsec"])
    assert with_dynsec.mosquitto_dynsec and with_dynsec.instance_id == "a"  # tests/test_instances_dynsec.py
    with pytest.raises(ConfigError, match="--instance-id"):
        parse(["--instance-id", "a b", "--database", PG, "--mqtt-url", MQTT])


def start_instances(tmp_path: Path, database: str, broker_url: str, names: str = INSTANCES,
                    extra: tuple[str, ...] = (),
                    extra_for: Mapping[str, tuple[str, ...]] | None = None) -> list[Service]:
    """Instances (data dir tmp_path/NAME/service-data), one after another, with flags `extra` (and
    extra_for[NAME]); the first makes the job-signing key, the others are given the same one."""
    services = []
    for name in names:
        (tmp_path / name).mkdir(exist_ok=True)
        own = (extra_for or {}).get(name, ())
        service = Service(tmp_path / name, broker_url, database, ("--instance-id", name, *extra, *own))
        if services:
            service.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for key_file in signing.key_files(services[0].data_dir):
                shutil.copy2(key_file, service.data_dir / key_file.name)
        service.start()
        services.append(service)
    return services


def owners(database: str) -> dict[int, str]:
    """bucket -> the instance that holds an unexpired lease on it."""
    with psycopg2.connect(database) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT bucket, owner FROM ota_bucket_lease WHERE owner IS NOT NULL AND expires > now()")
        return dict(cursor.fetchall())


def pick_devices(database: str) -> list[str]:
    """Once every instance holds some buckets: device ids, DEVICES_PER_INSTANCE owned by each.

    One reading of the leases serves both the check and the picks: a bucket handed from one
    instance to another is briefly held by none."""
    snapshot: dict[int, str] = {}

    def all_held() -> bool:
        snapshot.clear()
        snapshot.update(owners(database))
        return set(snapshot.values()) == set(INSTANCES) and len(snapshot) == BUCKETS

    wait_until(all_held, 30, "every instance to hold leases")
    held = dict(snapshot)
    chosen: dict[str, list[str]] = {name: [] for name in INSTANCES}
    for device_id in (f"node-{n}" for n in range(1000)):
        picks = chosen[held[bucket_of(device_id)]]
        if len(picks) < DEVICES_PER_INSTANCE:
            picks.append(device_id)
    return [d for picks in chosen.values() for d in picks]


@pytest.mark.mosquitto
@pytest.mark.postgres
def test_three_instances_survive_one_killed(tmp_path: Path) -> None:
    with fresh_postgres() as database, start_mosquitto(tmp_path) as broker:
        services = start_instances(tmp_path, database, broker.url)
        agents: list[Agent] = []
        try:
            token = (services[0].data_dir / "admin-token").read_text().strip()
            apis = [Api(s.base_url, token) for s in services]
            run_dir = tmp_path / "runs"
            run_dir.mkdir()
            devices = pick_devices(database)
            for n, device_id in enumerate(devices):
                password = apis[n % 3].device(device_id, group="fleet")
                agents.append(Agent(tmp_path, device_id, password, broker.url,
                                    server_key_file=services[0].signing_key_file))
                agents[-1].start()
            runs = f'"{run_dir}/$OTA_DEVICE_ID.runs"'
            workflow = apis[0].workflow(f'echo "$OTA_JOB_ID" >> {runs}; sleep 0.5')
            parents = []
            for number in range(ROUNDS):
                alive = apis if number < KILL_AFTER_ROUND else apis[:2]
                parents.append(alive[number % len(alive)].submit(workflow, f"round-{number}", DeviceGroup="fleet"))
                if number == KILL_AFTER_ROUND - 1:
                    services[2].stop(signal.SIGKILL)
            for n, parent in enumerate(parents):
                job = apis[n % 2].wait_job(parent, timeout=60)
                assert job["Status"] == "SUCCEEDED", job
            expected: dict[str, list[str]] = {d: [] for d in devices}
            for parent in parents:
                for child in apis[0].ok("GET", f"/v1/job/{parent}/childjobs"):
                    assert child["Status"] == "SUCCEEDED", child
                    expected[child["DeviceId"]].append(child["JobId"])
            for device_id in devices:  # each job once, in submission order
                assert (run_dir / f"{device_id}.runs").read_text().split() == expected[device_id], device_id
            assert set(owners(database).values()) == {"a", "b"}  # the killed instance's buckets were taken over
        finally:
            for process in [*agents, *services]:
                process.stop()


@pytest.mark.postgres
def test_a_bucket_has_one_owner_until_its_lease_expires() -> None:
    with fresh_postgres() as database:
        store = Store(database)
        try:
            store.call_sync(leases.prepare)
            assert store.call_sync(leases.hold_share, "a", 30, BUCKETS) == set(range(BUCKETS))
            assert store.call_sync(leases.hold_share, "b", 30, BUCKETS // 2) == set()  # none free
            extra = set(range(BUCKETS // 2, BUCKETS))
            assert store.call_sync(leases.hold_share, "a", 30, BUCKETS // 2, extra) == set(range(BUCKETS // 2))
            assert store.call_sync(leases.hold_share, "b", 30, BUCKETS // 2) == extra
            assert store.call_sync(leases.hold_share, "b", 0.2, BUCKETS) == extra  # renewed, a's still held
            time.sleep(0.3)  # b's leases expire: a takes them; b's renewal finds none
            assert store.call_sync(leases.hold_share, "a", 30, BUCKETS) == set(range(BUCKETS))
            assert store.call_sync(leases.hold_share, "b", 30, BUCKETS) == set()
        finally:
            store.close()
