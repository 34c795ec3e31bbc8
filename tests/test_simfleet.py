"""The fleet simulator (bench/simfleet.py) still runs: a few devices, both processes, one group job.

It logs in against Mosquitto as shipped (accounts written by the service), and against the
service's embedded broker (`--broker embedded`), so a device that could not log in, a head that
did not verify or a job that never got final fails the run.
No timing is checked: the figures it prints are for bench/RESULTS.md.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.publish
import pytest

from tests.support.mosquitto import mosquitto_binary, start_mosquitto

SIMFLEET = Path(__file__).resolve().parents[1] / "bench" / "simfleet.py"
DEVICES = 20
pytestmark = pytest.mark.mosquitto


def test_simfleet_runs_a_group_job_on_every_simulated_device() -> None:
    mosquitto_binary()  # skips (fails under CI=true) without Mosquitto
    run = subprocess.run([sys.executable, str(SIMFLEET), "--devices", str(DEVICES), "--processes", "2",
                          "--accounts", "--register-threads", "1", "--restart", "--timeout", "60"],
                         capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = run.stdout.splitlines()[-1]
    assert f"connected {DEVICES}, subscribed {DEVICES}," in summary, run.stdout
    assert f"ran {DEVICES}," in summary and "rejected 0, refused 0, lost 0" in summary, run.stdout
    assert f"all {DEVICES} children final" in run.stdout
    assert "every connected device verified a republished head" in run.stdout


def test_on_an_open_broker_the_restart_checks_every_registered_devices_retained_head() -> None:
    """Devices registered but never connected get their head after a restart too: the run checks
    the broker's retained heads of all of them, not only what the connected devices saw."""
    mosquitto_binary()
    run = subprocess.run([sys.executable, str(SIMFLEET), "--devices", str(DEVICES), "--connect", "5",
                          "--processes", "2", "--restart", "--timeout", "60"],
                         capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"the broker carried a new head for all {DEVICES} devices" in run.stdout, run.stdout
    assert f"verified and for its device, for all {DEVICES} registered devices" in run.stdout, run.stdout


def test_the_retained_head_check_names_the_devices_without_a_good_head(tmp_path: Path) -> None:
    mosquitto_binary()
    sys.path.insert(0, str(SIMFLEET.parent))
    try:
        simfleet = importlib.import_module("simfleet")
    finally:
        sys.path.remove(str(SIMFLEET.parent))
    topics = simfleet.Topics()
    with start_mosquitto(tmp_path) as broker:
        paho.mqtt.publish.single(topics.job("sim-000001"), b"not a head", qos=1, retain=True,
                                 hostname="127.0.0.1", port=broker.port)
        fresh, problems = simfleet.retained_heads(broker.port, (bytes(32),), time.time(), 2, 10)
    assert fresh == 0
    assert problems[0] == "sim-000000: no retained head", problems
    assert problems[1].startswith("sim-000001: "), problems


def test_simfleet_runs_a_group_job_on_the_embedded_broker() -> None:
    """The same fleet on the service's own broker: each device logs in with its registered password
    (the embedded broker checks it) and stays connected through an idle spell."""
    run = subprocess.run([sys.executable, str(SIMFLEET), "--devices", str(DEVICES), "--processes", "2",
                          "--broker", "embedded", "--idle", "1", "--timeout", "60"],
                         capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "the embedded broker" in run.stdout.splitlines()[0], run.stdout
    assert f"idle 1 s, {DEVICES} devices connected" in run.stdout, run.stdout
    summary = run.stdout.splitlines()[-1]
    assert f"connected {DEVICES}, subscribed {DEVICES}," in summary, run.stdout
    assert f"ran {DEVICES}," in summary and "rejected 0, refused 0, lost 0" in summary, run.stdout
    assert "disconnected 0 clients as silent" in summary, run.stdout
    assert f"all {DEVICES} children final" in run.stdout
