"""agent/spawn.py: held shells started with posix_spawn do what subprocess.Popen's arguments asked for.

Real processes, no mocks; no timing asserted.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from agent import spawn
from agent.protocol import JobStatus
from agent.runner import RunLimits, Runner, _popen

HELD = ["/bin/sh", "-c", "read _ || exit 125; echo ran; exit 7", "/bin/sh"]


def run(command: str):
    return Runner("job-1", command, RunLimits(timeout_seconds=30, kill_grace=1.0, pipe_grace=0.5)).run()


def test_the_runner_spawns_its_shells_with_posix_spawn():
    gate_read, gate = os.pipe()
    try:
        shell = _popen(HELD, gate_read, None)
    finally:
        os.close(gate_read)
    assert isinstance(shell, spawn.Shell)
    os.write(gate, b"go\n")
    os.close(gate)
    assert shell.wait() == 7
    assert os.read(shell.stdout.fileno(), 100) == b"ran\n"
    shell.stdout.close()
    shell.stderr.close()


def test_a_command_holds_no_descriptor_the_agent_was_given():
    """Popen's close_fds: an inheritable descriptor of the agent (from its parent) is closed in the command."""
    given, other_end = os.pipe()
    os.set_inheritable(given, True)
    try:
        result = run(f"if [ -e /proc/$$/fd/{given} ]; then echo held; else echo closed; fi")
        assert os.get_inheritable(given)  # the agent's own descriptor is left as it was
    finally:
        os.close(given)
        os.close(other_end)
    assert (result.status, result.stdout) == (JobStatus.SUCCEEDED, "closed\n")


def test_a_command_gets_sigpipe_back_at_its_default():
    """Popen's restore_signals: Python ignores SIGPIPE, a command's pipeline must not."""
    result = run("yes | head -n 1")
    assert (result.status, result.stdout, result.stderr) == (JobStatus.SUCCEEDED, "y\n", "")


def test_the_command_leads_a_session_of_its_own():
    result = run('ps -o sid= -p $$; echo $$')
    session, pid = result.stdout.split()
    assert session == pid


def test_an_exec_that_fails_raises_as_popen_does():
    gate_read, gate = os.pipe()
    try:
        with pytest.raises(FileNotFoundError):
            spawn.spawn(["/no/such/shell", "-c", "true"], gate_read, None)
    finally:
        os.close(gate_read)
        os.close(gate)


def test_a_gate_on_a_standard_descriptor_is_left_to_popen():
    assert spawn.spawn(HELD, 0, None) is None


def test_wait_with_a_timeout_raises_while_the_shell_is_held_and_reaps_it_after():
    gate_read, gate = os.pipe()
    try:
        shell = spawn.spawn(HELD, gate_read, None)
    finally:
        os.close(gate_read)
    assert shell is not None
    with pytest.raises(subprocess.TimeoutExpired):
        shell.wait(timeout=0.01)
    assert shell.poll() is None
    os.close(gate)  # no word on the gate: the held shell exits 125 without running anything
    assert shell.wait(timeout=30) == 125
    assert shell.poll() == 125
    shell.stdout.close()
    shell.stderr.close()
    with pytest.raises(ValueError):
        shell.stdout.fileno()
