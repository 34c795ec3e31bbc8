"""Run one job's shell command and turn what happened into a final status.

The command runs in a new session, so it leads its own process group; a timeout, a cancel
or leftover background children holding the output pipes end the WHOLE group: SIGTERM first,
then SIGKILL once the grace period has passed.

Right after the start the runner hands the command's ProcessGroup (its id plus the leader's
start time and the boot id) to `on_started`, which journals it: an agent that died while the
command ran can then end what is left of it after its restart (`stop_leftovers`).

A killed command (TIMED_OUT, CANCELED) reports ExitCode null: it did not exit on its own,
and the Status and Reason say why it stopped. A command that dies of a signal it did not
get from the agent reports FAILED with the negative signal number as ExitCode (Python's
convention) and a Reason naming the signal.

Standard library only, like the rest of the agent.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Mapping

from . import protocol
from .protocol import JobStatus, Key

if TYPE_CHECKING:  # subprocess is imported when the first command starts: an idle agent never needs it
    import subprocess

# How long to wait between checks of the command, the clock and the cancel flag.
_SIGKILL_SETTLE_SECONDS = 2.0
_POLL_SECONDS = 0.05
_READ_CHUNK = 64 * 1024

INTERRUPTED_REASON = "the agent restarted while the command ran"
LEFTOVERS_STOPPED_REASON = "; its leftover processes were stopped"
_BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


@dataclass(frozen=True)
class RunLimits:
    """How long a command may run and how much of its output is kept."""

    timeout_seconds: float
    output_cap: int = protocol.OUTPUT_CAP_BYTES  # bytes kept per stream: the tail
    kill_grace: float = 5.0  # seconds between SIGTERM and SIGKILL
    pipe_grace: float = 2.0  # seconds the output may stay open after the command exits


@dataclass(frozen=True)
class RunResult:
    """The final outcome of one job, as the agent reports it."""

    job_id: str
    status: JobStatus
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    start_time: datetime
    end_time: datetime
    reason: str | None = None

    def status_message(self) -> dict[str, Any]:
        """The final message for the status topic."""
        return {
            Key.JOB_ID: self.job_id,
            Key.STATUS: self.status.value,
            Key.EXIT_CODE: self.exit_code,
            Key.STDOUT: self.stdout,
            Key.STDERR: self.stderr,
            Key.STDOUT_TRUNCATED: self.stdout_truncated,
            Key.STDERR_TRUNCATED: self.stderr_truncated,
            Key.START_TIME: protocol.format_time(self.start_time),
            Key.END_TIME: protocol.format_time(self.end_time),
            Key.REASON: self.reason,
        }

    @classmethod
    def without_output(
        cls, job_id: str, status: JobStatus, start_time: datetime, reason: str | None
    ) -> RunResult:
        """A result for a command that produced nothing the agent saw."""
        return cls(job_id, status, None, "", "", False, False, start_time, protocol.utc_now(), reason)

    @classmethod
    def interrupted(
        cls, job_id: str, start_time: datetime, success_on_restart: bool, leftovers_stopped: bool = False
    ) -> RunResult:
        """The result of a job that was running when the agent died (e.g. it rebooted the board).

        `leftovers_stopped`: the restarted agent found the command still running and killed it.
        """
        reason = INTERRUPTED_REASON + (LEFTOVERS_STOPPED_REASON if leftovers_stopped else "")
        if success_on_restart:
            return cls.without_output(job_id, JobStatus.SUCCEEDED, start_time, f"{reason} (SuccessOnRestart)")
        return cls.without_output(job_id, JobStatus.INTERRUPTED, start_time, reason)


def in_progress_message(job_id: str, start_time: datetime) -> dict[str, Any]:
    """The first message for the status topic, sent before the command starts."""
    return {
        Key.JOB_ID: job_id,
        Key.STATUS: JobStatus.IN_PROGRESS.value,
        Key.START_TIME: protocol.format_time(start_time),
    }


class TailReader(threading.Thread):
    """Reads one pipe to its end, keeping only the last `cap` bytes."""

    def __init__(self, stream: Any, cap: int, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._fd = stream.fileno()
        self._cap = cap
        self._tail = bytearray()
        self._abandon = threading.Event()
        self.truncated = False

    def run(self) -> None:
        while not self._abandon.is_set():
            ready, _, _ = select.select([self._fd], [], [], _POLL_SECONDS)
            if ready and not self._keep(os.read(self._fd, _READ_CHUNK)):
                return

    def _keep(self, chunk: bytes) -> bool:
        """Append a chunk to the tail; False at end of file."""
        self._tail += chunk
        if len(self._tail) > self._cap:
            del self._tail[: len(self._tail) - self._cap]
            self.truncated = True
        return bool(chunk)

    def abandon(self) -> None:
        """Stop reading even though the pipe is still open (a process outside our group holds it)."""
        self._abandon.set()

    def text(self) -> str:
        """The kept tail as text, starting at a character boundary when it was cut."""
        tail = bytes(self._tail)
        if self.truncated:
            tail = _skip_continuation(tail)
        return tail.decode("utf-8", errors="replace")


def _skip_continuation(data: bytes) -> bytes:
    """Drop up to 3 leading UTF-8 continuation bytes left by cutting a character in half."""
    start = 0
    while start < min(3, len(data)) and 0x80 <= data[start] < 0xC0:
        start += 1
    return data[start:]


@dataclass(frozen=True)
class ProcessGroup:
    """A command's process group, as journalled so that a restarted agent can end what is left of it.

    `pgid` is the pid of the group's leader, the shell. `boot_id` and `start_ticks` (the leader's
    start time: field 22 of /proc/<pid>/stat, clock ticks since boot) tell the group apart from
    an unrelated process that got the same pid after a reboot or a pid reuse.
    """

    pgid: int
    boot_id: str
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> ProcessGroup | None:
        """The group the process `pid` leads; None without /proc (then nothing can be checked later)."""
        leader, boot_id = _read_stat(pid), _boot_id()
        if leader is None or boot_id is None:
            return None
        return cls(pid, boot_id, leader.start_ticks)

    def still_running(self) -> bool:
        """Whether live processes of this very group are left.

        Only on the same boot. If a process holds the leader's pid, it must have the leader's
        start time (Linux does not reuse a pid while a group of that id exists, so another start
        time means the group is long gone). If the leader is gone, a live process whose group
        AND session are `pgid` is one the command left behind. Processes that left the group or
        the session (setsid, setpgid) are not found. Without /proc: False.
        """
        if _boot_id() != self.boot_id:
            return False
        leader = _read_stat(self.pgid)
        if leader is not None:
            return leader.start_ticks == self.start_ticks and _group_alive(self.pgid)
        return _group_alive(self.pgid, session=self.pgid)


def stop_leftovers(group: ProcessGroup, kill_grace: float) -> bool:
    """End what a dead agent's command left running, as the runner ends a group; True if it did.

    Does nothing (False) on another boot, for a pid now held by an unrelated process, or without
    /proc. Between the check and the signal the group could end and its id be reused: that
    window is microseconds wide, and pid reuse needs the whole pid space to wrap around.
    """
    if not group.still_running():
        return False
    end_group(group.pgid, kill_grace)
    return True


def end_group(pgid: int, kill_grace: float, leader_reaped: Callable[[], bool] = lambda: True) -> None:
    """SIGTERM the whole group, wait for it to empty, SIGKILL what is left, wait for that to die.

    `leader_reaped` reaps the leader when it is our child, so it does not keep the group alive
    as a zombie; a leader that is not our child is reaped by init.
    """
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + kill_grace
    while time.monotonic() < deadline:
        if leader_reaped() and not _group_alive(pgid):
            return
        time.sleep(_POLL_SECONDS)
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + _SIGKILL_SETTLE_SECONDS  # a SIGKILL lands asynchronously
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS / 10)


class Runner:
    """Runs one command once. `run()` blocks; `cancel()` may be called from any thread.

    `on_started` is called (on the thread that runs `run()`) with the command's ProcessGroup
    once it runs; not at all without /proc.
    """

    def __init__(
        self, job_id: str, command: str, limits: RunLimits, env: Mapping[str, str] | None = None,
        on_started: Callable[[ProcessGroup], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.command = command
        self.limits = limits
        self.env = dict(env) if env is not None else None  # None: inherit the agent's environment
        self._on_started = on_started
        self.start_time = protocol.utc_now()
        self._cancel = threading.Event()
        self._cancel_reason: str | None = None

    def cancel(self, reason: str) -> None:
        """Kill the command's process group; the result becomes CANCELED with this reason."""
        self._cancel_reason = reason
        self._cancel.set()

    def run(self) -> RunResult:
        try:
            process = self._start()
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the command
            reason = f"the command could not be started: {e}"
            return RunResult.without_output(self.job_id, JobStatus.FAILED, self.start_time, reason)
        readers = [
            TailReader(process.stdout, self.limits.output_cap, f"stdout-{process.pid}"),
            TailReader(process.stderr, self.limits.output_cap, f"stderr-{process.pid}"),
        ]
        for reader in readers:
            reader.start()
        self._announce(process.pid)
        try:
            stopped = self._wait(process)
            self._drain(process, readers)
        finally:
            process.stdout.close()
            process.stderr.close()
        return self._result(process, readers, stopped)

    def _announce(self, pid: int) -> None:
        group = ProcessGroup.of(pid)  # the leader is our unreaped child: its pid is not reused yet
        if group is not None and self._on_started is not None:
            self._on_started(group)

    def _start(self) -> subprocess.Popen[bytes]:
        import subprocess  # noqa: PLC0415 - lazily, see the top of the module

        return subprocess.Popen(
            self.command,
            shell=True,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            env=self.env,
        )

    def _wait(self, process: subprocess.Popen[bytes]) -> tuple[JobStatus, str] | None:
        """Wait for the command; on timeout or cancel kill its group and say why."""
        import subprocess  # noqa: PLC0415 - lazily, see the top of the module

        deadline = time.monotonic() + self.limits.timeout_seconds
        while True:
            try:
                process.wait(timeout=_POLL_SECONDS)
                return None
            except subprocess.TimeoutExpired:
                pass
            stopped = self._stop_reason(deadline)
            if stopped is not None:
                self._kill_group(process)
                return stopped

    def _stop_reason(self, deadline: float) -> tuple[JobStatus, str] | None:
        if self._cancel.is_set():
            return JobStatus.CANCELED, self._cancel_reason or "canceled"
        if time.monotonic() >= deadline:
            timeout = f"{self.limits.timeout_seconds:g}"
            return JobStatus.TIMED_OUT, f"the command ran past its timeout of {timeout} s and was killed"
        return None

    def _kill_group(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM the whole group, wait for it to empty, SIGKILL what is left; reap the leader."""
        end_group(process.pid, self.limits.kill_grace, lambda: process.poll() is not None)
        process.wait()

    def _drain(self, process: subprocess.Popen[bytes], readers: list[TailReader]) -> None:
        """Read the output to its end; background children holding the pipes get killed."""
        _join_all(readers, self.limits.pipe_grace)
        if any(reader.is_alive() for reader in readers):
            self._kill_group(process)
            _join_all(readers, self.limits.pipe_grace)
        for reader in readers:  # still open: held by a process that left our group
            reader.abandon()
            reader.join()

    def _result(
        self, process: subprocess.Popen[bytes], readers: list[TailReader], stopped: tuple[JobStatus, str] | None
    ) -> RunResult:
        exit_code: int | None = process.returncode
        if stopped is not None:
            status, reason, exit_code = stopped[0], stopped[1], None
        else:
            status, reason = _exit_status(process.returncode)
        out, err = readers
        return RunResult(
            self.job_id, status, exit_code, out.text(), err.text(), out.truncated, err.truncated,
            self.start_time, protocol.utc_now(), reason,
        )


def _exit_status(returncode: int) -> tuple[JobStatus, str | None]:
    if returncode == 0:
        return JobStatus.SUCCEEDED, None
    if returncode < 0:
        return JobStatus.FAILED, f"the command was killed by signal {_signal_name(-returncode)}"
    return JobStatus.FAILED, None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int, session: int | None = None) -> bool:
    """Whether any live (not zombie) process is left in the group (and in `session`, if given).

    Orphans of the group are reaped by init, which may take a while; a zombie cannot hold a
    pipe or do harm, so it does not count. Without /proc, any member counts.
    """
    try:
        with os.scandir("/proc") as entries:  # closed even when any() stops early
            return any(_live_member(entry, pgid, session) for entry in entries if entry.name.isdigit())
    except OSError:
        return _group_exists(pgid)


def _live_member(entry: os.DirEntry[str], pgid: int, session: int | None) -> bool:
    stat = _read_stat(int(entry.name))
    return (stat is not None and stat.alive and stat.pgrp == pgid
            and (session is None or stat.session == session))


@dataclass(frozen=True)
class _Stat:
    """The fields of /proc/<pid>/stat the agent reads."""

    state: bytes  # field 3: Z zombie, X dead, anything else alive
    pgrp: int  # field 5
    session: int  # field 6
    start_ticks: int  # field 22: clock ticks after boot

    @property
    def alive(self) -> bool:
        return self.state not in (b"Z", b"X")


def _read_stat(pid: int) -> _Stat | None:
    """None when the process is gone (or there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold ") "
        return _Stat(fields[0], int(fields[2]), int(fields[3]), int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        with open(_BOOT_ID_FILE, encoding="ascii") as f:
            return f.read().strip() or None
    except (OSError, ValueError):
        return None


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _join_all(threads: list[TailReader], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
