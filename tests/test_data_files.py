"""The data directory and the database files are the service's alone: 0700 and 0600."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ota_bridge.store import Store
from tests.support.processes import REPO, Service


def test_data_dir_is_0700_and_database_files_0600(service: Service) -> None:
    assert service.data_dir.stat().st_mode & 0o777 == 0o700
    for name in ("ota-bridge.db", "ota-bridge.db-wal", "ota-bridge.db-shm"):
        assert (service.data_dir / name).stat().st_mode & 0o777 == 0o600, name


def test_a_database_file_others_could_read_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "ota-bridge.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    Store(f"sqlite:///{path}").close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_data_dir_others_can_list_is_warned_about(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_BRIDGE_")}
    create = [sys.executable, "-m", "ota_bridge", "token", "create", "--name", "t", "--data-dir", str(data)]
    done = subprocess.run(create,
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert done.returncode == 0 and f"'chmod 700 {data}'" in done.stderr


def test_the_documented_mosquitto_layout_is_not_warned_about(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o710)  # docs/security.md: Mosquitto's group may only pass through to its accounts directory
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_BRIDGE_")}
    create = [sys.executable, "-m", "ota_bridge", "token", "create", "--name", "t", "--data-dir", str(data)]
    done = subprocess.run(create,
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert done.returncode == 0 and "chmod 700" not in done.stderr
