"""The runner: exit codes, captured output tails, and killing whole process groups."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent.protocol import JobStatus, Key
from agent.runner import ProcessGroup, RunLimits, Runner, RunResult, Standby, in_progress_message, stop_leftovers

FAST = dict(kill_grace=1.0, pipe_grace=0.5)


def run(command, timeout=30.0, **limits):
    return Runner("job-1", command, RunLimits(timeout_seconds=timeout, **{**FAST, **limits})).run()


def is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")


def wait_for_file(path: Path, deadline_seconds: float = 10.0) -> str:
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} was not written within {deadline_seconds} s")


@pytest.fixture
def pidfile(tmp_path):
    """A file the command writes a background child's pid to; that child is killed at the end."""
    path = tmp_path / "pid"
    yield path
    if path.exists():
        for line in path.read_text().split():
            try:
                os.kill(int(line), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_exit_zero_succeeds_with_stdout_and_stderr():
    result = run("echo hello; echo oops >&2")
    assert (result.status, result.exit_code, result.reason) == (JobStatus.SUCCEEDED, 0, None)
    assert (result.stdout, result.stderr) == ("hello\n", "oops\n")
    assert (result.stdout_truncated, result.stderr_truncated) == (False, False)


def test_the_command_runs_with_the_given_environment():
    runner = Runner("job-1", 'echo "$OTA_JOB_ID ${HOME:-unset}"', RunLimits(timeout_seconds=30),
                    env={"PATH": os.defpath, "OTA_JOB_ID": "job-1"})
    assert runner.run().stdout == "job-1 unset\n"


def test_nonzero_exit_fails_with_its_exit_code():
    result = run("echo partial; exit 3")
    assert (result.status, result.exit_code, result.stdout) == (JobStatus.FAILED, 3, "partial\n")


def test_a_command_killed_by_a_signal_fails_with_the_negative_signal_number():
    result = run("kill -KILL $$")
    assert (result.status, result.exit_code) == (JobStatus.FAILED, -signal.SIGKILL)
    assert "SIGKILL" in result.reason


def test_a_command_that_cannot_be_started_fails_with_a_reason():
    result = run("echo a\0b")
    assert (result.status, result.exit_code) == (JobStatus.FAILED, None)
    assert result.reason.startswith("the command could not be started")


def test_output_keeps_the_last_cap_bytes_and_flags_the_cut():
    result = run("head -c 100000 /dev/zero | tr '\\0' a; echo END; echo small >&2", output_cap=1000)
    assert result.stdout_truncated is True
    assert len(result.stdout) == 1000 and result.stdout.endswith("aaaEND\n")
    assert (result.stderr, result.stderr_truncated) == ("small\n", False)


def test_output_at_exactly_the_cap_is_not_truncated():
    result = run("printf 1234567890", output_cap=10)
    assert (result.stdout, result.stdout_truncated) == ("1234567890", False)


def test_a_cut_through_a_multibyte_character_does_not_start_with_garbage():
    result = run("for i in 1 2 3 4 5 6 7 8 9 10; do printf '\\303\\251'; done", output_cap=5)
    assert (result.stdout, result.stdout_truncated) == ("éé", True)


def test_invalid_utf8_is_replaced_not_fatal():
    result = run("printf 'a\\377b'")
    assert (result.status, result.stdout) == (JobStatus.SUCCEEDED, "a\ufffdb")


def test_timeout_kills_the_whole_process_group(tmp_path, pidfile):
    result = run(f"sleep 300 & echo $! > {pidfile}; wait", timeout=0.5)
    assert (result.status, result.exit_code) == (JobStatus.TIMED_OUT, None)
    assert "timeout of 0.5 s" in result.reason
    assert not is_running(int(pidfile.read_text()))


def test_timeout_escalates_to_sigkill_when_the_group_ignores_sigterm(tmp_path, pidfile):
    result = run(f"trap '' TERM; sleep 300 & echo $! > {pidfile}; wait", timeout=0.5, kill_grace=0.5)
    assert result.status is JobStatus.TIMED_OUT
    assert not is_running(int(pidfile.read_text()))


def test_cancel_from_another_thread_kills_the_group_and_reports_canceled(tmp_path, pidfile):
    runner = Runner("job-1", f"echo started; sleep 300 & echo $! > {pidfile}; wait",
                    RunLimits(timeout_seconds=60, **FAST))
    results: list[RunResult] = []
    worker = threading.Thread(target=lambda: results.append(runner.run()))
    worker.start()
    try:
        pid = int(wait_for_file(pidfile))
        runner.cancel("the head moved on")
    finally:
        worker.join(timeout=30)
    (result,) = results
    assert (result.status, result.exit_code, result.reason) == (JobStatus.CANCELED, None, "the head moved on")
    assert result.stdout == "started\n"
    assert not is_running(pid)


@pytest.fixture(params=["pidfd", "polling"])
def exit_wait(request, monkeypatch):
    """How the runner learns that the command's shell exited: a pidfd (Linux 5.3+), or polling."""
    if request.param == "pidfd":
        assert hasattr(os, "pidfd_open")
    else:
        monkeypatch.delattr(os, "pidfd_open")
    return request.param


@pytest.mark.parametrize("command, status, exit_code, stdout", [
    ("echo out; exit 5", JobStatus.FAILED, 5, "out\n"),
    ("echo out; exec >&- 2>&-; sleep 0.3; exit 3", JobStatus.FAILED, 3, "out\n"),  # outputs closed first
    ("exec 3>&1; (sleep 0.3; echo late >&3) & exec >&- 2>&- 3>&-", JobStatus.SUCCEEDED, 0, "late\n"),  # exits first
])
def test_the_exit_and_the_whole_output_are_seen_whichever_ends_first(exit_wait, command, status, exit_code, stdout):
    result = run(command)
    assert (result.status, result.exit_code, result.stdout) == (status, exit_code, stdout)


@pytest.mark.parametrize("reason", ["ENOSYS", "EMFILE"])
def test_without_a_pidfd_the_runner_polls_for_the_exit(monkeypatch, reason):
    def no_pidfd(pid):
        raise OSError(getattr(__import__("errno"), reason), reason)

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    assert (run("echo out; exit 4").exit_code, run("exec >&-; sleep 0.2").status) == (4, JobStatus.SUCCEEDED)


def test_a_background_child_holding_the_pipes_does_not_hang_the_runner(tmp_path, pidfile):
    result = run(f"sleep 300 & echo $! > {pidfile}; echo done")
    assert (result.status, result.exit_code, result.stdout) == (JobStatus.SUCCEEDED, 0, "done\n")
    assert not is_running(int(pidfile.read_text()))


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid(1)")
def test_a_child_that_left_the_group_holding_the_pipes_does_not_hang_the_runner(tmp_path, pidfile):
    result = run(f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 300' & echo done")
    assert (result.status, result.stdout) == (JobStatus.SUCCEEDED, "done\n")
    assert is_running(int(wait_for_file(pidfile)))  # out of reach of the group kill; the fixture kills it


def test_final_status_message_has_every_key():
    message = run("echo hi").status_message()
    assert set(message) == {Key.JOB_ID, Key.STATUS, Key.EXIT_CODE, Key.STDOUT, Key.STDERR, Key.STDOUT_TRUNCATED,
                            Key.STDERR_TRUNCATED, Key.START_TIME, Key.END_TIME, Key.REASON}
    assert (message[Key.JOB_ID], message[Key.STATUS], message[Key.STDOUT]) == ("job-1", "SUCCEEDED", "hi\n")
    assert message[Key.START_TIME].endswith("Z") and message[Key.END_TIME] >= message[Key.START_TIME]


def test_in_progress_message_carries_the_runner_start_time():
    runner = Runner("job-9", "true", RunLimits(timeout_seconds=1))
    message = in_progress_message(runner.job_id, runner.start_time)
    assert message == {Key.JOB_ID: "job-9", Key.STATUS: "IN_PROGRESS",
                       Key.START_TIME: runner.run().status_message()[Key.START_TIME]}


@pytest.mark.parametrize("success_on_restart, status", [(False, JobStatus.INTERRUPTED), (True, JobStatus.SUCCEEDED)])
def test_interrupted_result_depends_on_success_on_restart(success_on_restart, status):
    runner = Runner("job-1", "true", RunLimits(timeout_seconds=1))
    result = RunResult.interrupted("job-1", runner.start_time, success_on_restart)
    assert (result.status, result.exit_code) == (status, None)
    assert result.reason.startswith("the agent restarted while the command ran")


# --- a group left running by a dead agent ---------------------------------------------------


@pytest.fixture
def orphan_group():
    """Start a command in its own session, as the runner does; its whole group is killed at the end."""
    started = []

    def start(command: str) -> subprocess.Popen:
        process = subprocess.Popen(command, shell=True, start_new_session=True)
        started.append(process)
        return process

    yield start
    for process in started:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def test_the_runner_announces_its_commands_process_group():
    groups = []
    Runner("job-1", "true", RunLimits(timeout_seconds=30, **FAST), on_started=groups.append).run()
    (group,) = groups
    assert group.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert group.pgid > 0 and group.start_ticks > 0


def test_a_recorded_group_that_still_runs_is_stopped(orphan_group):
    process = orphan_group("sleep 300")
    group = ProcessGroup.of(process.pid)
    assert group.still_running()
    assert stop_leftovers(group, kill_grace=1.0)
    process.wait(timeout=5)
    assert not is_running(process.pid) and not group.still_running()


def test_a_recorded_group_whose_leader_started_at_another_time_is_left_alone(orphan_group):
    process = orphan_group("sleep 300")
    reused = ProcessGroup.of(process.pid)._replace(start_ticks=ProcessGroup.of(process.pid).start_ticks + 1)
    assert not reused.still_running()
    assert not stop_leftovers(reused, kill_grace=1.0)
    assert is_running(process.pid)


def test_a_recorded_group_from_another_boot_is_left_alone(orphan_group):
    process = orphan_group("sleep 300")
    other_boot = ProcessGroup.of(process.pid)._replace(boot_id="00000000-0000-0000-0000-000000000000")
    assert not stop_leftovers(other_boot, kill_grace=1.0)
    assert is_running(process.pid)


def test_without_its_leader_the_group_is_found_by_its_session(orphan_group, pidfile):
    process = orphan_group(f"sleep 300 & echo $! > {pidfile}")
    group = ProcessGroup.of(process.pid)
    process.wait(timeout=5)  # the leader is gone; its background child is left
    child = int(wait_for_file(pidfile))
    assert group.still_running()
    assert stop_leftovers(group, kill_grace=1.0)
    assert not is_running(child)


def test_a_process_that_left_the_session_is_not_found(orphan_group, pidfile):
    process = orphan_group(f"setsid sleep 300 & echo $! > {pidfile}")
    group = ProcessGroup.of(process.pid)
    process.wait(timeout=5)
    escaped = int(wait_for_file(pidfile))
    deadline = time.monotonic() + 5
    while Path(f"/proc/{escaped}/stat").read_bytes().rsplit(b")", 1)[1].split()[3] != str(escaped).encode():
        assert time.monotonic() < deadline, "setsid never ran"
        time.sleep(0.02)  # until setsid has made it a session of its own
    assert not group.still_running()
    assert is_running(escaped)


def test_the_interrupted_reason_says_when_leftovers_were_stopped():
    result = RunResult.interrupted("job-1", datetime.now(timezone.utc), False, leftovers_stopped=True)
    assert result.reason == "the agent restarted while the command ran; its leftover processes were stopped"


# --- the gate: the command is spawned held, and runs only once the caller opens the gate ---------


def test_a_spawned_command_waits_for_run_and_a_discarded_one_never_runs(tmp_path):
    marker = tmp_path / "ran"
    runner = Runner("job-1", f"echo ran > {marker}", RunLimits(timeout_seconds=30, **FAST))
    group = runner.spawn()
    assert group is not None and group.still_running()  # the held shell exists, in its own group
    time.sleep(0.2)
    assert not marker.exists()
    runner.discard()
    assert not marker.exists() and not group.still_running()

    ran = Runner("job-2", f"echo ran > {marker}", RunLimits(timeout_seconds=30, **FAST))
    spawned = ran.spawn()
    result = ran.run()
    assert result.status is JobStatus.SUCCEEDED and marker.read_text() == "ran\n"
    assert spawned.pgid > 0 and not spawned.still_running()


def test_a_command_canceled_before_its_gate_opened_never_runs(tmp_path):
    marker = tmp_path / "ran"
    runner = Runner("job-1", f"echo ran > {marker}", RunLimits(timeout_seconds=30, **FAST))
    runner.spawn()
    runner.cancel("superseded")
    result = runner.run()
    assert (result.status, result.reason, result.exit_code) == (JobStatus.CANCELED, "superseded", None)
    assert not marker.exists()


def test_a_held_command_whose_agent_died_before_the_gate_opened_never_runs(tmp_path):
    """The agent dies (SIGKILL) after spawning and journalling, before `run`: the gate pipe closes
    with it, and the held shell exits without running the command."""
    marker = tmp_path / "ran"
    pgid = group_of_a_killed_agent(
        "from agent.runner import Runner, RunLimits\n"
        f"group = Runner('job-1', 'echo ran > {marker}', RunLimits(timeout_seconds=30)).spawn()\n")
    assert gone(pgid)
    assert not marker.exists()


def group_of_a_killed_agent(code: str) -> int:
    """Run `code`, which sets `group`, in a process that then prints the group's id and SIGKILLs itself."""
    holder = subprocess.run(
        [sys.executable, "-c", f"import os, signal\n{code}print(group.pgid, flush=True)\n"
                               "os.kill(os.getpid(), signal.SIGKILL)\n"],
        capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parent.parent)
    assert holder.returncode == -signal.SIGKILL, holder.stderr
    return int(holder.stdout.split()[0])


def gone(pid: int, seconds: float = 10) -> bool:
    """Whether the process ends (or is a zombie) within `seconds`."""
    deadline = time.monotonic() + seconds
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not is_running(pid)


# --- the standby: the next job's shell, started before the job is known ------------------------

ENV = {"PATH": os.defpath, "LANG": "C.UTF-8", "X": "1"}
JOB_ENV = {**ENV, "OTA_JOB_ID": "job-1"}


def standby():
    shell = Standby.start(ENV, "OTA_JOB_ID")
    assert shell is not None and shell.group is not None and shell.group.still_running()
    return shell


@pytest.mark.parametrize("command", [
    "echo hi; echo oops >&2",
    'printf "%s|%s|%s|%s\\n" "$OTA_JOB_ID" "$#" "$0" "${X}"; env | sort | grep -v "^_=" | cksum',
    "cat <<X\nline 1\n  back\\slash\tand tab\nX\nexit 3",
    "echo é€😀\n\n",
    "echo no newline at the end\necho two",
    "nosuchcommand",
    "if then",
    "read line; echo \"read: $line\"",  # standard input is /dev/null, as for a spawned shell
])
def test_a_standby_runs_a_job_as_a_shell_spawned_for_it_would(command):
    spawned = Runner("job-1", command, RunLimits(timeout_seconds=30, **FAST), env=JOB_ENV)
    spawned.spawn()
    expected = spawned.run()
    shell = standby()
    runner = Runner("job-1", command, RunLimits(timeout_seconds=30, **FAST), env=JOB_ENV)
    assert runner.spawn(shell) == shell.group  # the job's group is the standby's: journalled before it runs
    result = runner.run()
    assert (result.status, result.exit_code, result.stdout, result.stderr, result.reason) == (
        expected.status, expected.exit_code, expected.stdout, expected.stderr, expected.reason)
    assert not shell.group.still_running()


@pytest.mark.parametrize("why", ["other-env", "long-command", "dead", "inherited-env"])
def test_a_standby_that_does_not_fit_is_discarded_and_the_job_spawns_its_own(tmp_path, why):
    marker = tmp_path / "ran"
    shell = standby()
    command = f"echo ran > {marker}; echo $OTA_JOB_ID"
    env = {**JOB_ENV, "OTA_ARTIFACTS_DIR": "/x"} if why == "other-env" else JOB_ENV
    if why == "long-command":
        command += " #" + "x" * 1024
    if why == "dead":
        os.kill(shell.process.pid, signal.SIGKILL)
        shell.process.wait()
    env = None if why == "inherited-env" else env
    runner = Runner("job-1", command, RunLimits(timeout_seconds=30, **FAST), env=env)
    group = runner.spawn(shell)
    assert group != shell.group and shell.gate is None and shell.process.returncode is not None
    if why != "dead":
        assert shell.process.returncode == 125  # discarded: it ran nothing
    result = runner.run()
    assert (result.status, marker.read_text()) == (JobStatus.SUCCEEDED, "ran\n")


def test_a_discarded_standby_runs_nothing():
    shell = standby()
    shell.discard()
    assert shell.process.returncode == 125 and not shell.group.still_running()
    shell.discard()  # twice: nothing


@pytest.mark.parametrize("opener", ["open_gate", "run"])
def test_a_standby_killed_before_its_gate_opened_fails_the_job_without_running_it(tmp_path, opener):
    marker = tmp_path / "ran"
    shell = standby()
    runner = Runner("job-1", f"echo ran > {marker}", RunLimits(timeout_seconds=30, **FAST), env=JOB_ENV)
    runner.spawn(shell)
    os.kill(shell.process.pid, signal.SIGKILL)
    assert gone(shell.process.pid)
    if opener == "open_gate":
        runner.open_gate()
    result = runner.run()
    assert (result.status, result.exit_code) == (JobStatus.FAILED, None)
    assert "its shell ended before it was let run" in result.reason and "exit -9" in result.reason
    assert not marker.exists()


def test_a_standby_whose_agent_died_before_the_gate_opened_runs_nothing(tmp_path):
    """The agent gave the standby a job (spawn) and journalled it, then died before `run`: the gate
    closes with it, and the standby exits without reading a job."""
    marker = tmp_path / "ran"
    pgid = group_of_a_killed_agent(
        "from agent.runner import Runner, RunLimits, Standby\n"
        "shell = Standby.start({'PATH': os.defpath}, 'OTA_JOB_ID')\n"
        f"group = Runner('job-1', 'echo ran > {marker}', RunLimits(timeout_seconds=30),\n"
        "                env={'PATH': os.defpath, 'OTA_JOB_ID': 'job-1'}).spawn(shell)\n"
        "assert group == shell.group\n")
    assert gone(pgid)
    assert not marker.exists()


def test_a_standby_refuses_a_variable_name_the_shell_would_not_take():
    with pytest.raises(ValueError, match="not a shell variable name"):
        Standby.start(ENV, "OTA JOB; rm -rf /")


def test_a_gate_opened_before_run_lets_the_command_run_and_run_waits_for_it(tmp_path):
    marker = tmp_path / "ran"
    runner = Runner("job-1", f"echo ran > {marker}; echo out", RunLimits(timeout_seconds=30, **FAST))
    runner.spawn()
    runner.open_gate()
    wait_for_file(marker)  # it runs before anyone waits for it
    result = runner.run()
    assert (result.status, result.stdout) == (JobStatus.SUCCEEDED, "out\n")


def test_a_command_canceled_after_its_gate_opened_is_killed_not_waited_for(tmp_path, pidfile):
    runner = Runner("job-1", f"echo $$ > {pidfile}; exec sleep 300", RunLimits(timeout_seconds=30, **FAST))
    runner.spawn()
    runner.open_gate()
    pid = int(wait_for_file(pidfile))
    runner.cancel("superseded")
    result = runner.run()
    assert (result.status, result.reason, result.exit_code) == (JobStatus.CANCELED, "superseded", None)
    assert not is_running(pid)


def test_a_canceled_runners_gate_stays_shut(tmp_path):
    marker = tmp_path / "ran"
    runner = Runner("job-1", f"echo ran > {marker}", RunLimits(timeout_seconds=30, **FAST))
    runner.spawn()
    runner.cancel("superseded")
    runner.open_gate()
    assert runner.run().status is JobStatus.CANCELED
    assert not marker.exists()
