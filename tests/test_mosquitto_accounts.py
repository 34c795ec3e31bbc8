"""Mosquitto's accounts as the service keeps them, set up exactly as docs/security.md says.

Mosquitto drops to an unprivileged user (`mosquitto`, as Debian's package makes it), as in
production, and reads the password and ACL files that the service rewrites on every
registration. Two set-ups: the documented one (the service as its own user, `nobody` here, with
CAP_KILL; a setgid accounts directory of group mosquitto), and the one the earlier docs gave
(files handed to group mosquitto by hand in a directory without setgid; the service as root),
which a rewrite must not break either.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from agent.protocol import Topics
from ota_bridge import credentials
from ota_bridge.broker_accounts import ACL, PASSWORDS, PID, write_mosquitto_files
from tests.conftest import Launcher
from tests.support.fake_device import FakeDevice
from tests.support.mosquitto import REPO_ROOT, Mosquitto, logs_in, start_mosquitto
from tests.support.processes import Api, Service, wait_until

pytestmark = pytest.mark.mosquitto

DOCUMENTED, BY_HAND = "documented set-up", "files given to the group by hand, service as root"
LOGIN_SECONDS = 10.0  # Mosquitto acts on SIGHUP in its main loop, a moment after the service's answer
SERVICE_USER = "nobody"  # stands for the docs' `ota-bridge` user


def mosquitto_user() -> tuple[str, str]:
    """(user, group) Mosquitto drops to, as Debian's package makes them; the test needs root."""
    try:
        if os.geteuid() == 0:
            return "mosquitto", grp.getgrgid(pwd.getpwnam("mosquitto").pw_gid).gr_name
        message = "running Mosquitto and the service as unprivileged users needs root"
    except KeyError:
        message = "there is no user mosquitto (Debian's mosquitto package makes it)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; under CI=true Mosquitto tests must run")
    pytest.skip(message)


def as_user(user: str) -> list[str]:
    """The docs' way to run the service as its own user, able to signal Mosquitto (CAP_KILL) and nothing more."""
    if user == "root":
        return []
    return ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--init-groups",
            "--inh-caps=+kill", "--ambient-caps=+kill"]


def follow_the_recipe(data_dir: Path, layout: str, owner: str, group: str) -> Path:
    """docs/security.md's steps with the test's paths and users."""
    accounts = data_dir / "mosquitto"
    subprocess.run(["install", "-d", "-o", owner, "-g", group, "-m", "0710", str(data_dir)], check=True)
    mode = "2770" if layout == DOCUMENTED else "0770"
    subprocess.run(["install", "-d", "-o", owner, "-g", group, "-m", mode, str(accounts)], check=True)
    subprocess.run([*as_user(owner), sys.executable, "-m", "ota_bridge", "mosquitto-config", "--out", str(accounts),
                    "--data-dir", str(data_dir)], check=True, capture_output=True, timeout=60, cwd=REPO_ROOT)
    if layout == BY_HAND:
        subprocess.run(["chgrp", group, str(accounts / PASSWORDS), str(accounts / ACL)], check=True)
    return accounts


@dataclass
class Fleet:
    service: Service
    broker: Mosquitto
    accounts: Path
    group: str
    user: str  # the service's

    @property
    def api(self) -> Api:
        return self.service.api


@pytest.fixture(scope="module", params=[DOCUMENTED, BY_HAND])
def fleet(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    user, group = mosquitto_user()
    owner = SERVICE_USER if request.param == DOCUMENTED else "root"
    # Under /tmp, not pytest's tmp dir: Mosquitto's user must pass through every parent (0700 there).
    workdir = Path(tempfile.mkdtemp(prefix="ota-mosquitto-accounts-", dir="/tmp"))
    workdir.chmod(0o711)
    launcher = Launcher(workdir)
    try:
        accounts = follow_the_recipe(workdir / "service-data", request.param, owner, group)
        with start_mosquitto(workdir, accounts_dir=accounts, user=user) as broker:
            wait_until(lambda: (accounts / PID).exists(), 10, f"Mosquitto's pid file; log:\n{broker.log_text()}")
            service = Service(workdir, mqtt_url=broker.url, extra=("--mosquitto-dir", str(accounts)))
            service.argv[:0] = as_user(owner)
            launcher.started.append(service)
            service.start()
            yield Fleet(service, broker, accounts, group, owner)
            print(f"----- mosquitto log -----\n{broker.log_text()[-5000:]}")
    finally:
        launcher.close()
        shutil.rmtree(workdir, ignore_errors=True)


def wait_login(fleet: Fleet, username: str, password: str) -> None:
    wait_until(lambda: logs_in(fleet.broker.port, username, password), LOGIN_SECONDS,
               f"{username} to log in on Mosquitto; its log:\n{fleet.broker.log_text()[-3000:]}")


def test_after_the_reload_a_new_device_and_the_service_still_log_in(fleet: Fleet) -> None:
    password = fleet.api.device("fresh-1")  # a rewrite, then SIGHUP: Mosquitto rereads as its own user
    wait_login(fleet, "fresh-1", password)
    operator = (fleet.service.data_dir / "mqtt-operator-password").read_text().strip()
    wait_login(fleet, "api", operator)
    for name in (PASSWORDS, ACL):
        info = (fleet.accounts / name).stat()
        assert (grp.getgrgid(info.st_gid).gr_name, stat.S_IMODE(info.st_mode)) == (fleet.group, 0o640), name
    device = FakeDevice(fleet.broker.url, "fresh-1", password)  # the service still publishes and hears
    try:
        job = fleet.api.submit(fleet.api.workflow("true"), DeviceId="fresh-1")
        child = fleet.api.ok("GET", f"/v1/job/{job}/childjobs")[0]["JobId"]
        device.head_for(child)
        device.report(child, "SUCCEEDED", ExitCode=0)
        assert fleet.api.wait_job(job)["Status"] == "SUCCEEDED"
    finally:
        device.close()


def test_concurrent_registrations_each_succeed_and_each_device_logs_in(fleet: Fleet) -> None:
    ids = [f"burst-{n}" for n in range(20)]
    with ThreadPoolExecutor(len(ids)) as pool:
        answers = list(pool.map(lambda d: fleet.api.request("POST", "/v1/device", {"DeviceId": d}), ids))
    assert [a.status for a in answers] == [201] * len(ids), [a.body for a in answers if a.status != 201]
    for device_id, answer in zip(ids, answers, strict=True):
        wait_login(fleet, device_id, answer.body["MqttPassword"])
    assert not [p for p in fleet.accounts.iterdir() if p.name.endswith(".tmp")], "a rewrite left a temporary file"


def test_a_bulk_registration_is_one_rewrite_and_every_device_logs_in(fleet: Fleet) -> None:
    body = {"Devices": [{"DeviceId": f"bulk-{n}"} for n in range(30)]}
    with ThreadPoolExecutor(4) as pool:  # with single registrations beside it
        singles = pool.map(lambda d: fleet.api.request("POST", "/v1/device", {"DeviceId": d}), ["lone-1", "lone-2"])
        answer = fleet.api.request("POST", "/v1/devices", body)
    assert answer.status == 201 and [a.status for a in singles] == [201, 201], answer.body
    for device in answer.body["Devices"][::10]:
        wait_login(fleet, device["DeviceId"], device["MqttPassword"])


def test_a_failed_rewrite_undoes_a_bulk_registration(fleet: Fleet) -> None:
    passwords = fleet.accounts / PASSWORDS
    aside = fleet.accounts / "passwords.aside"
    passwords.rename(aside)
    passwords.mkdir()
    try:
        answer = fleet.api.request("POST", "/v1/devices", {"Devices": [{"DeviceId": "doomed-1"},
                                                                       {"DeviceId": "doomed-2"}]})
        assert answer.status == 500 and "2 devices were not registered" in answer.body["Detail"], answer.body
        assert fleet.api.request("GET", "/v1/device/doomed-2").status == 404
    finally:
        passwords.rmdir()
        aside.rename(passwords)


def test_a_failed_rewrite_undoes_the_registration(fleet: Fleet) -> None:
    passwords = fleet.accounts / PASSWORDS
    aside = fleet.accounts / "passwords.aside"
    passwords.rename(aside)
    passwords.mkdir()  # nothing can replace a directory: the rewrite fails
    try:
        answer = fleet.api.request("POST", "/v1/device", {"DeviceId": "doomed"})
        assert answer.status == 500 and str(passwords) in answer.body["Detail"], answer.body
        assert fleet.api.request("GET", "/v1/device/doomed").status == 404
    finally:
        passwords.rmdir()
        aside.rename(passwords)
    password = fleet.api.device("doomed")  # the id is free again, and the next rewrite works
    wait_login(fleet, "doomed", password)


def test_a_stale_pid_file_naming_another_process_is_not_signalled(fleet: Fleet) -> None:
    pid_file = fleet.accounts / PID
    mosquitto_pid = pid_file.read_text()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        pid_file.write_text(f"{bystander.pid}\n")  # Mosquitto died; its pid went to another process
        fleet.api.device("after-crash")
        wait_until(lambda: f"pid {bystander.pid}" in fleet.service.log(), 10, "the service's warning")
        assert bystander.poll() is None, "the service sent SIGHUP to a process that is not Mosquitto"
        warning = next(line for line in fleet.service.log().splitlines() if f"pid {bystander.pid}" in line)
        assert "'sleep'" in warning and "not Mosquitto" in warning, warning
    finally:
        pid_file.write_text(mosquitto_pid)
        bystander.kill()
        bystander.wait()


def test_an_id_with_a_colon_is_refused_at_registration(fleet: Fleet) -> None:
    answer = fleet.api.request("POST", "/v1/device", {"DeviceId": "line:7"})
    assert answer.status == 400, answer.body
    assert "DeviceId" in answer.body["Detail"] and "':'" in answer.body["Detail"], answer.body


def test_an_older_id_with_a_colon_stays_readable_and_deletable_and_locks_out_no_one(fleet: Fleet) -> None:
    register = ("from ota_bridge.store import Store, devices; db = Store(f'sqlite:///{sys.argv[1]}'); "
                "db.call_sync(devices.register_device, 'line:8', None, []); db.close()")
    subprocess.run([*as_user(fleet.user), sys.executable, "-c", f"import sys; {register}",  # as before ':' was refused
                    str(fleet.service.data_dir / "ota-bridge.db")], check=True, timeout=60, cwd=REPO_ROOT)
    password = fleet.api.device("after-legacy")  # a rewrite with that id in the registry
    wait_login(fleet, "after-legacy", password)
    users = [line.split(":", 1)[0] for line in (fleet.accounts / PASSWORDS).read_text().splitlines()]
    assert "line" not in users
    assert fleet.api.ok("GET", "/v1/device/line:8")["DeviceId"] == "line:8"
    fleet.api.ok("DELETE", "/v1/device/line:8")


def test_a_rewrite_keeps_the_owner_group_and_mode_it_found(tmp_path: Path) -> None:
    _, group = mosquitto_user()
    accounts, hashed = tmp_path / "accounts", credentials.hash_password("secret")
    write_mosquitto_files([("dev1", hashed)], accounts, tmp_path, Topics())
    for name in (PASSWORDS, ACL):
        shutil.chown(accounts / name, group=group)
        (accounts / name).chmod(0o604)
    write_mosquitto_files([("dev1", hashed), ("dev2", hashed)], accounts, tmp_path, Topics())
    for name in (PASSWORDS, ACL):
        info = (accounts / name).stat()
        assert (grp.getgrgid(info.st_gid).gr_name, stat.S_IMODE(info.st_mode)) == (group, 0o604), name
    assert "dev2:" in (accounts / PASSWORDS).read_text()
