"""The path a new user takes: start-up errors in one line, the wrong directory refused, presence
right after restarts, the agent telling it may be on the wrong broker, the service telling the
exact agent and watch commands."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from tests.conftest import Launcher
from tests.support.databases import DEFAULT_POSTGRES
from tests.support.mosquitto import BROKERS, broker_url, free_port
from tests.support.processes import REPO, Process, _env, wait_until


def ota_bridge(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ota_bridge", *args], capture_output=True, text=True, cwd=cwd,
                          env=env or _env(), timeout=60)


def serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return ota_bridge("serve", "--http", f"127.0.0.1:{free_port()}", "--mqtt-listen", f"127.0.0.1:{free_port()}",
                      *args, env=env)


def assert_one_line(done: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert all(word in lines[0] for word in words), lines[0]


def _postgres(database: str) -> str:
    base = os.environ.get("OTA_TEST_POSTGRES_URL", DEFAULT_POSTGRES)
    return base.rsplit("/", 1)[0] + "/" + database


# --- start-up errors: one line, never a traceback --------------------------------------------

def test_a_data_dir_under_a_regular_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    assert_one_line(serve(tmp_path, "--data-dir", str(tmp_path / "file" / "data")),
                    "cannot create the data directory", "--data-dir", "Not a directory")


def test_a_data_dir_nobody_can_write_is_one_line(tmp_path: Path) -> None:
    assert_one_line(serve(tmp_path, "--data-dir", "/proc"), "cannot write in the data directory /proc")


def test_an_unreachable_postgresql_is_one_line(tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    assert_one_line(serve(tmp_path, "--data-dir", str(tmp_path / "d"), "--database", url),
                    "cannot open the PostgreSQL database 'test'", "Connection refused")


@pytest.mark.postgres
def test_an_unknown_postgresql_database_is_one_line(tmp_path: Path) -> None:
    name = f"nosuch_{uuid.uuid4().hex[:12]}"
    done = serve(tmp_path, "--data-dir", str(tmp_path / "d"), "--database", _postgres(name))
    if "Connection refused" in done.stderr and os.environ.get("CI") != "true":
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    assert_one_line(done, f"database \"{name}\" does not exist")


def test_a_postgresql_url_without_a_database_is_one_line(tmp_path: Path) -> None:
    assert_one_line(serve(tmp_path, "--data-dir", str(tmp_path / "d"), "--database", "postgresql://127.0.0.1:5432"),
                    "--database / OTA_BRIDGE_DATABASE", "names no database")


def test_a_missing_postgresql_driver_says_what_to_install(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "psycopg2"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = _env()
    env["PYTHONPATH"] = f"{shadow.parent}{os.pathsep}{env['PYTHONPATH']}"
    done = serve(tmp_path, "--data-dir", str(tmp_path / "d"), "--database", _postgres("test"), env=env)
    assert_one_line(done, "PostgreSQL support is not installed", "pip install 'ota-bridge[postgres]'")


# --- the wrong directory ----------------------------------------------------------------------

def test_reading_commands_refuse_a_directory_that_is_not_a_data_directory(tmp_path: Path) -> None:
    for command in (("token", "list"), ("token", "revoke", "--name", "x"), ("signing-key", "show"),
                    ("signing-key", "rotate")):
        done = ota_bridge(*command, cwd=tmp_path)
        assert_one_line(done, "the data directory ota-bridge-data does not exist", "--data-dir")
    (tmp_path / "empty").mkdir()
    done = ota_bridge("token", "list", "--data-dir", str(tmp_path / "empty"))
    assert_one_line(done, "is not an ota-bridge data directory", "ota-bridge.db")
    assert list((tmp_path / "empty").iterdir()) == [] and not (tmp_path / "ota-bridge-data").exists()


# --- presence after restarts ------------------------------------------------------------------

def test_a_device_is_not_shown_online_after_the_service_and_its_agent_stopped(launch: Launcher) -> None:
    service = launch.service()
    password = service.api.device("dev1")
    agent = launch.agent(service, "dev1", password)
    wait_until(lambda: service.api.ok("GET", "/v1/device/dev1")["Online"], 30, "the device online")
    service.stop()  # the embedded broker goes with it: the agent cannot say offline any more
    agent.kill()
    service.start()
    assert service.api.ok("GET", "/v1/device/dev1")["Online"] is False
    agent.start()
    wait_until(lambda: service.api.ok("GET", "/v1/device/dev1")["Online"], 30, "the device online again")


# --- the tour: the commands the service prints work as printed ----------------------------------

@pytest.mark.parametrize("kind", BROKERS)
def test_the_agent_and_watch_commands_the_service_prints_run_a_job(kind: str, launch: Launcher, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with broker_url(kind, tmp_path) as (url, extra):
        service = launch.service(mqtt_url=url, extra=extra)
        log = service.log().splitlines()
        agent_line = log[log.index(next(line for line in log if "Start a device's agent" in line)) + 1].strip()
        watch_line = log[log.index(next(line for line in log if "Watch every device's queue" in line)) + 1].strip()
        port = service.broker_url.rsplit(":", 1)[1]
        assert f"--broker mqtt://127.0.0.1:{port} " in agent_line and "--password " not in agent_line
        assert f"-p {port} " in watch_line and " -P " not in watch_line
        (tmp_path / "dev1.password").write_text(service.api.device("dev1") + "\n")
        xdg, watch = watch_line.split(" ", 1)
        watcher = subprocess.Popen(shlex.split(watch), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**_env(), xdg.split("=")[0]: xdg.split("=", 1)[1]})
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(watcher.stdout.readline, "")), daemon=True)
        reader.start()
        try:
            argv = shlex.split(agent_line.replace("DEVICE-ID", "dev1"))
            agent = Process("printed agent", argv, tmp_path / "a.log")
            launch.started.append(agent)
            monkeypatch.chdir(tmp_path)  # the printed --state-dir and --password-file are relative to where it runs
            agent.start()
            # The device's first head is published (retained) when it first comes online: once the watcher
            # prints it, it has subscribed, so it cannot miss the job's status messages (not retained).
            wait_until(lambda: any("ota/v1/devices/dev1/job" in line for line in lines), 30, "the watcher subscribed")
            job = service.api.submit(service.api.workflow("echo tour"), DeviceId="dev1")
            assert service.api.wait_job(job, 60)["Result"] == "tour\n"
        finally:
            watcher.terminate()
            watcher.wait(timeout=10)
            reader.join(timeout=10)
            watcher.stdout.close()
            service.stop()
        seen = "".join(lines)
        assert "ota/v1/devices/dev1/status" in seen and '"Status":"SUCCEEDED"' in seen, seen


# --- --help -----------------------------------------------------------------------------------

def test_help_shows_placeholders_and_hides_test_only_flags() -> None:
    serve_help = ota_bridge("serve", "--help").stdout
    assert "--http HOST:PORT" in serve_help and "--mqtt-listen HOST:PORT" in serve_help
    assert "--failpoints" not in serve_help
    agent_help = subprocess.run([sys.executable, "-m", "agent", "--help"], capture_output=True, text=True,
                                cwd=REPO, env=_env(), timeout=60).stdout
    assert "--broker mqtt[s]://HOST:PORT" in agent_help and "--head-wait" not in agent_help
    readme = (REPO / "README.md").read_text()
    for flag in ("--http HOST:PORT", "--mqtt-listen HOST:PORT", "--mqtt-url mqtt[s]://USER:PASS@HOST:PORT",
                 "--broker mqtt[s]://HOST:PORT"):
        assert flag in readme and flag in serve_help + agent_help
