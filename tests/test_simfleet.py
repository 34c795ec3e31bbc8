"""The fleet simulator (bench/simfleet.py) still runs: a few devices, both processes, one group job.

It logs in against Mosquitto as shipped (accounts written by the service), and against the
service's embedded broker (`--broker embedded`), so a device that could not log in, a head that
did not verify or a job that never got final fails the run.
No timing is checked: the figures it prints are for bench/RESULTS.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.mosquitto import mosquitto_binary

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
