"""deploy/: the systemd units pass `systemd-analyze verify`, their settings files name only real
settings, and the agent installs alone with paho-mqtt as its only dependency."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent.settings import load_settings
from ota_bridge import settings as service_settings
from ota_bridge import signing
from tests.support.processes import REPO

DEPLOY = REPO / "deploy"
UNITS = {"ota-bridge.service": "/opt/ota-bridge/bin/ota-bridge", "ota-agent.service": "/opt/ota-agent/bin/ota-agent"}
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


@pytest.mark.skipif(SYSTEMD_ANALYZE is None and not os.environ.get("CI"), reason="needs systemd-analyze")
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_the_unit_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    program = tmp_path / Path(UNITS[unit]).name  # verify wants ExecStart's program to exist
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    text = (DEPLOY / unit).read_text()
    assert f"ExecStart={UNITS[unit]}" in text
    (tmp_path / unit).write_text(text.replace(UNITS[unit], str(program)))
    done = subprocess.run([SYSTEMD_ANALYZE or "systemd-analyze", "verify", "--man=no", str(tmp_path / unit)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout + done.stderr, done.stdout + done.stderr  # warnings too


def test_the_service_settings_file_names_only_real_settings(tmp_path: Path) -> None:
    values = env_file(DEPLOY / "ota-bridge.env")
    known = {option.env for option in service_settings.OPTIONS}
    assert values and set(values) <= known, set(values) - known
    parser = argparse.ArgumentParser()
    service_settings.add_arguments(parser)
    assert service_settings.resolve(parser.parse_args([]), values).log_format == "json"


def test_the_agent_settings_file_names_only_real_settings(tmp_path: Path) -> None:
    values = env_file(DEPLOY / "ota-agent.env")
    assert all(key.startswith("OTA_AGENT_") for key in values)
    (tmp_path / "password").write_text("secret\n")
    signing.load_or_create(tmp_path, True)
    files = {"OTA_AGENT_PASSWORD_FILE": str(tmp_path / "password"), "OTA_AGENT_STATE_DIR": str(tmp_path / "state"),
             "OTA_AGENT_SERVER_KEY_FILE": str(signing.key_files(tmp_path, signing.ACTIVE)[1])}
    assert set(files) <= set(values)
    loaded = load_settings([], {**values, **files})
    assert loaded.device_id == values["OTA_AGENT_DEVICE_ID"] and loaded.broker_url == values["OTA_AGENT_BROKER"]


def test_the_agent_alone_pulls_in_paho_mqtt_and_nothing_else(tmp_path: Path) -> None:
    source = tmp_path / "agent"
    shutil.copytree(REPO / "agent", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", ".*"))
    wheels = tmp_path / "wheels"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name.split("-")[0] for p in wheels.glob("*.whl"))
    assert names == ["ota_agent", "paho_mqtt"], names
    agent_wheel = next(wheels.glob("ota_agent-*.whl"))
    top = {name.split("/")[0] for name in zipfile.ZipFile(agent_wheel).namelist()}
    assert top == {"agent", agent_wheel.name.split("-py")[0] + ".dist-info"}, top
    for wheel in wheels.glob("*.whl"):
        zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    # The agent runs from these two wheels alone: no site-packages (-S), so no ota_bridge, no aiohttp.
    run = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path[0] = sys.argv[1]; "
                          "from agent.daemon import main; sys.exit(main(['--version']))", str(tmp_path / "site")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.startswith("ota-agent "), run.stdout + run.stderr


def test_the_agent_package_has_the_version_of_the_project() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    agent = tomllib.loads((REPO / "agent" / "pyproject.toml").read_text())["project"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert agent["version"] == project["version"]
    assert agent["dependencies"] == [d for d in project["dependencies"] if d.startswith("paho-mqtt")]
    assert agent["scripts"] == {"ota-agent": project["scripts"]["ota-agent"]}
