"""Run one job's shell command and turn what happened into a final status.

The command runs in a new session, so it leads its own process group; a timeout, a cancel
or leftover background children holding the output pipes end the WHOLE group: SIGTERM first,
then SIGKILL once the grace period has passed.

The command is started held at a gate (`spawn`): its shell exists, in its own session, but
waits on a pipe before it runs anything. Its ProcessGroup (its id plus the leader's start time
and the boot id) is known then, so the caller journals the start and the group in ONE durable
write before `run` opens the gate: an agent that died while the command ran can end what is left
of it after its restart (`stop_leftovers`), and an agent that dies before opening the gate
closes the pipe with its death, so the held shell exits without running the command.
`on_started` (for callers that do not spawn first) gets the group before the gate opens.

Spawning the held shell (fork, exec, Popen's handshake: 1-2 ms on a small board's budget of a
few) can be done before the job is known: a Standby shell, started between jobs, waits at its
gate for the job itself (its id and its command, in one atomic pipe write after the journal
write) and then becomes the command's shell as the held shell does, with the same environment.
`Runner.spawn(standby)` takes it when the job fits (its environment is the standby's plus its job
id, its command short: STANDBY_MAX_BYTES), else discards it and spawns as before.

One thread (the caller of `run`) waits for the command and reads both output pipes (select). On
Linux 5.3 and later it also selects on a pidfd of the command's shell, so its exit wakes the thread
at once; elsewhere it polls the exit (Popen.wait's sleeps, 0.5 ms doubling, while the outputs are
closed; every _POLL_SECONDS while they are open).

A killed command (TIMED_OUT, CANCELED) reports ExitCode null: it did not exit on its own,
and the Status and Reason say why it stopped. A command that dies of a signal it did not
get from the agent reports FAILED with the negative signal number as ExitCode (Python's
convention) and a Reason naming the signal.

Standard library only, like the rest of the agent.
"""

from __future__ import annotations

import os
import re
import select
import signal
import threading
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Union

from . import protocol
from .protocol import JobStatus, Key
from .spawn import Shell, spawn

if TYPE_CHECKING:  # subprocess is imported only where posix_spawn cannot start the shells (agent/spawn.py)
    import subprocess

Process = Union[Shell, "subprocess.Popen[bytes]"]  # a held shell, however it was started

# How long to wait between checks of the command, the clock and the cancel flag.
_SIGKILL_SETTLE_SECONDS = 2.0
_POLL_SECONDS = 0.05
_READ_CHUNK = 64 * 1024

INTERRUPTED_REASON = "the agent restarted while the command ran"
LEFTOVERS_STOPPED_REASON = "; its leftover processes were stopped"
_BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


class RunLimits(NamedTuple):
    """How long a command may run and how much of its output is kept."""

    timeout_seconds: float
    output_cap: int = protocol.OUTPUT_CAP_BYTES  # bytes kept per stream: the tail
    kill_grace: float = 5.0  # seconds between SIGTERM and SIGKILL
    pipe_grace: float = 2.0  # seconds the output may stay open after the command exits


class RunResult(NamedTuple):
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


class _Tail:
    """One output pipe's kept tail: only the last `cap` bytes."""

    def __init__(self, stream: Any, cap: int) -> None:
        self.fd = stream.fileno()
        self._cap = cap
        self._tail = bytearray()
        self.truncated = False

    def keep(self, chunk: bytes) -> bool:
        """Append a chunk to the tail; False at end of file."""
        self._tail += chunk
        if len(self._tail) > self._cap:
            del self._tail[: len(self._tail) - self._cap]
            self.truncated = True
        return bool(chunk)

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


class ProcessGroup(NamedTuple):
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


# The held shell: wait for the gate (its standard input) to say go, then become the command's
# shell with the same pid (so the same process group and start time) and /dev/null as input.
# End of file on the gate (the agent died, or did not journal the start): exit, nothing run.
_GATE_SCRIPT = 'read _ || exit 125; exec /bin/sh -c "$1" </dev/null'
_SHELL = "/bin/sh"
# The standby shell: read the job id (a line) and the command (the rest, to the end of file) from
# the gate, export the id as VAR and become the command's shell, as the held shell does. It reads
# into VAR alone (the command's shell gets VAR anyway) and keeps the command in its positional
# parameters, so no other variable of the environment changes. Nothing on the gate: exit.
_STANDBY_SCRIPT = ('IFS= read -r VAR || exit 125; set -- "$VAR" ""; '
                   'while IFS= read -r VAR; do set -- "$1" "$2$VAR\n"; done; '
                   'set -- "$1" "$2$VAR"; VAR=$1; export VAR; exec /bin/sh -c "$2" </dev/null')
# The longest job a standby takes: its id, a newline and its command, in bytes. One pipe write of
# at most PIPE_BUF bytes is atomic, so the shell gets the whole job or nothing; and the shell
# reads it a byte at a time (the `read` builtin), so a longer command is quicker spawned anew.
STANDBY_MAX_BYTES = min(1024, select.PIPE_BUF)
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Standby:
    """A shell started ahead of the next job, held at its gate until a Runner gives it a job.

    `start` returns None when it cannot be started (the job then spawns its own). Its gate closed
    without a job (`discard`, or the agent's death): it exits 125 without running anything.
    """

    def __init__(self, env: Mapping[str, str], job_id_variable: str, process: Process,
                 gate: int) -> None:
        self.env = dict(env)
        self.job_id_variable = job_id_variable
        self.process = process
        self.gate: int | None = gate
        self.group = ProcessGroup.of(process.pid)

    @classmethod
    def start(cls, env: Mapping[str, str], job_id_variable: str) -> Standby | None:
        """A standby for jobs that run with `env` plus `job_id_variable` set to their id."""
        if not _SHELL_NAME.fullmatch(job_id_variable):
            raise ValueError(f"{job_id_variable!r} is not a shell variable name")
        script = _STANDBY_SCRIPT.replace("VAR", job_id_variable)
        gate_read, gate = os.pipe()
        try:
            process = _popen([_SHELL, "-c", script, _SHELL], gate_read, dict(env))
        except (OSError, ValueError):
            os.close(gate)
            return None
        finally:
            os.close(gate_read)
        return cls(env, job_id_variable, process, gate)

    def fits(self, job_id: str, command: str, env: Mapping[str, str] | None) -> bool:
        """Whether it can run this job exactly as a shell spawned for it would (and still waits)."""
        return (self.gate is not None and self.process.poll() is None and "\0" not in command
                and len(job_id.encode()) + 1 + len(command.encode()) <= STANDBY_MAX_BYTES
                and "\n" not in job_id and env == {**self.env, self.job_id_variable: job_id})

    def take(self) -> tuple[Process, int]:
        """Its process and gate, now the caller's."""
        gate, self.gate = self.gate, None
        assert gate is not None
        return self.process, gate

    def discard(self) -> None:
        """Close its gate with no job and reap it: it runs nothing."""
        if self.gate is None:
            return
        os.close(self.gate)
        self.gate = None
        self.process.wait()
        Runner._close_pipes(self.process)


class Runner:
    """Runs one command once. `spawn()` then `run()` (or `run()` alone); `run()` blocks;
    `cancel()` may be called from any thread.

    `spawn()` starts the command held at its gate and returns its ProcessGroup (None without
    /proc, or when it could not be started): journal it, then `run()` opens the gate; or
    `discard()` if the start could not be journalled, and the command never runs. `open_gate()`
    lets it run at once, before `run()` starts (on another thread) to wait for it.
    `on_started` is called (on the thread that runs `run()`) with the command's ProcessGroup
    before the gate opens; not at all without /proc.
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
        self._process: Process | None = None
        self._gate: int | None = None  # the write end of the gate pipe, until opened or discarded
        self._go = b"go\n"  # what opens the gate (a standby reads the job from it)
        self._opened = False  # the gate was opened: the command runs
        self._gate_error: OSError | None = None  # opening the gate failed: the shell is gone
        self._spawn_error: str | None = None
        self.group: ProcessGroup | None = None
        self.took_standby = False  # spawn() took the standby it was given

    def cancel(self, reason: str) -> None:
        """Kill the command's process group; the result becomes CANCELED with this reason."""
        self._cancel_reason = reason
        self._cancel.set()

    def spawn(self, standby: Standby | None = None) -> ProcessGroup | None:
        """Start the command's shell held at its gate, or take `standby` if it fits (else discard
        it); its group, or None (see the class)."""
        if self._process is not None or self._spawn_error is not None:
            if standby is not None:
                standby.discard()
            return self.group
        if standby is not None:
            if standby.fits(self.job_id, self.command, self.env):
                (self._process, self._gate), self.group = standby.take(), standby.group
                self.took_standby = True
                self._go = b"%s\n%s" % (self.job_id.encode(), self.command.encode())
                return self.group
            standby.discard()
        gate_read, self._gate = os.pipe()
        try:
            self._process = self._start(gate_read)
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the command
            self._spawn_error = f"the command could not be started: {e}"
            self._close_gate(b"")
            return None
        finally:
            os.close(gate_read)
        self.group = ProcessGroup.of(self._process.pid)  # our unreaped child: its pid is not reused yet
        return self.group

    def discard(self) -> None:
        """Never run the spawned command: close its gate unopened and reap the held shell."""
        self._close_gate(b"")
        if self._process is not None:
            self._process.wait()
            self._close_pipes(self._process)

    def run(self) -> RunResult:
        if self._process is None and self._spawn_error is None:
            self.spawn()
            if self.group is not None and self._on_started is not None:
                self._on_started(self.group)
        process = self._process
        if process is None:
            return RunResult.without_output(self.job_id, JobStatus.FAILED, self.start_time, self._spawn_error)
        if not self._opened and self._gate_error is None:
            if self._cancel.is_set():  # canceled before it ran: it never runs
                self.discard()
                return RunResult.without_output(self.job_id, JobStatus.CANCELED, self.start_time,
                                                self._cancel_reason or "canceled")
            self.open_gate()
        if self._gate_error is not None:  # its shell is gone (killed?): the command did not run
            process.wait()
            self._close_pipes(process)
            return RunResult.without_output(self.job_id, JobStatus.FAILED, self.start_time,
                                            f"the command could not be started: its shell ended before it was "
                                            f"let run ({self._gate_error.strerror}, exit {process.returncode})")
        tails = [_Tail(process.stdout, self.limits.output_cap), _Tail(process.stderr, self.limits.output_cap)]
        try:
            stopped = self._collect(process, tails)
        finally:
            self._close_pipes(process)
        return self._result(process, tails, stopped)

    def open_gate(self) -> None:
        """Let the spawned command run now (its start is journalled); `run`, on another thread, then
        waits for it. Nothing when it is not spawned, already running, or canceled; a shell that is
        gone is reported by `run` (FAILED)."""
        if self._gate is None or self._cancel.is_set():
            return
        try:
            self._close_gate(self._go)
        except OSError as e:
            self._gate_error = e
            return
        self._opened = True

    def _close_gate(self, word: bytes) -> None:
        if self._gate is None:
            return
        try:
            if word:
                os.write(self._gate, word)
        finally:
            os.close(self._gate)
            self._gate = None

    @staticmethod
    def _close_pipes(process: Process) -> None:
        process.stdout.close()
        process.stderr.close()

    def _start(self, gate_read: int) -> Process:
        return _popen([_SHELL, "-c", _GATE_SCRIPT, _SHELL, self.command], gate_read, self.env)

    def _collect(self, process: Process, tails: list[_Tail]) -> tuple[JobStatus, str] | None:
        """Read both outputs and wait for the command; on timeout or cancel kill its group and say why.

        Output still open after the command ended (background children holding the pipes) is read
        for the pipe grace, then the group is killed and read for one more grace; what is still
        open then is held by a process that left the group, and is abandoned.
        """
        deadline = time.monotonic() + self.limits.timeout_seconds
        open_tails = {tail.fd: tail for tail in tails}
        exit_fd = _pidfd(process.pid)  # readable once the shell has exited; None: poll for that
        try:
            while True:
                _read_ready(open_tails, _POLL_SECONDS, exit_fd)
                if not open_tails:
                    if _reaped(process, _POLL_SECONDS, exit_fd):
                        return None
                elif process.poll() is not None:
                    self._drain(process, open_tails)
                    return None
                stopped = self._stop_reason(deadline)
                if stopped is not None:
                    self._kill_group(process)
                    self._drain(process, open_tails)
                    return stopped
        finally:
            if exit_fd is not None:
                os.close(exit_fd)

    def _drain(self, process: Process, open_tails: dict[int, _Tail]) -> None:
        """Read the output to its end; background children still holding the pipes get killed."""
        _read_until(open_tails, self.limits.pipe_grace)
        if open_tails:
            self._kill_group(process)
            _read_until(open_tails, self.limits.pipe_grace)

    def _stop_reason(self, deadline: float) -> tuple[JobStatus, str] | None:
        if self._cancel.is_set():
            return JobStatus.CANCELED, self._cancel_reason or "canceled"
        if time.monotonic() >= deadline:
            timeout = f"{self.limits.timeout_seconds:g}"
            return JobStatus.TIMED_OUT, f"the command ran past its timeout of {timeout} s and was killed"
        return None

    def _kill_group(self, process: Process) -> None:
        """SIGTERM the whole group, wait for it to empty, SIGKILL what is left; reap the leader."""
        end_group(process.pid, self.limits.kill_grace, lambda: process.poll() is not None)
        process.wait()

    def _result(
        self, process: Process, tails: list[_Tail], stopped: tuple[JobStatus, str] | None
    ) -> RunResult:
        exit_code: int | None = process.returncode
        if stopped is not None:
            status, reason, exit_code = stopped[0], stopped[1], None
        else:
            status, reason = _exit_status(process.returncode)
        out, err = tails
        return RunResult(
            self.job_id, status, exit_code, out.text(), err.text(), out.truncated, err.truncated,
            self.start_time, protocol.utc_now(), reason,
        )


def _popen(argv: list[str], gate_read: int, env: dict[str, str] | None) -> Process:
    """Start a held shell: its own session, the gate as its input, its outputs to pipes. With
    posix_spawn (agent/spawn.py: the same in C); where it cannot, with subprocess.Popen."""
    shell = spawn(argv, gate_read, env)
    if shell is not None:
        return shell
    import subprocess  # noqa: PLC0415 - lazily, see the top of the module

    return subprocess.Popen(argv, start_new_session=True, stdin=gate_read, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, close_fds=True, env=env)


def _read_ready(open_tails: dict[int, _Tail], timeout: float, exit_fd: int | None = None) -> None:
    """Read what the open pipes have within `timeout` (less if `exit_fd`, the command's pidfd, says
    it exited); a pipe at its end leaves `open_tails`."""
    if not open_tails:
        return
    watched = [*open_tails, exit_fd] if exit_fd is not None else list(open_tails)
    ready, _, _ = select.select(watched, [], [], timeout)
    for fd in ready:
        if fd in open_tails and not open_tails[fd].keep(os.read(fd, _READ_CHUNK)):
            del open_tails[fd]


def _read_until(open_tails: dict[int, _Tail], timeout: float) -> None:
    """Read the open pipes until all are at their end or `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while open_tails and time.monotonic() < deadline:
        _read_ready(open_tails, min(_POLL_SECONDS, max(0.0, deadline - time.monotonic())))


def _reaped(process: Process, timeout: float, exit_fd: int | None = None) -> bool:
    """Whether the command's shell has exited (and is reaped), waiting up to `timeout` for it."""
    if exit_fd is not None:
        select.select([exit_fd], [], [], timeout)
        return process.poll() is not None
    import subprocess  # noqa: PLC0415 - lazily, see the top of the module

    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _pidfd(pid: int) -> int | None:
    """A pidfd of our unreaped child `pid` (readable once it exits); None where there is none
    (before Linux 5.3, or another system)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return pidfd_open(pid)
    except OSError:
        return None


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


class _Stat(NamedTuple):
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


_BOOT: list[str] = []  # this boot's id, once read: it cannot change while the agent runs


def _boot_id() -> str | None:
    if _BOOT:
        return _BOOT[0]
    try:
        with open(_BOOT_ID_FILE, encoding="ascii") as f:
            boot_id = f.read().strip() or None
    except (OSError, ValueError):
        return None
    if boot_id is not None:
        _BOOT.append(boot_id)
    return boot_id


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
