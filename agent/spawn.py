"""Start a command's held shell with posix_spawn, and the part of subprocess.Popen the runner uses.

subprocess.Popen spends most of a spawn in Python: it encodes the environment a variable at a
time (os.fsencode, twice per variable), builds its pipes, error pipe and exit stack, and checks
every argument, ~0.1-0.6 ms of the agent's CPU per job (the next job's shell is spawned after
every job: bench/profile_notes.md, group-latency-embedded). os.posix_spawn does the same in C
(glibc's clone(CLONE_VFORK) and exec, as Popen's vfork path does), with what Popen's arguments
asked for:

- start_new_session: setsid (POSIX_SPAWN_SETSID);
- close_fds: every descriptor this process opens itself is non-inheritable (PEP 446), and the
  inheritable ones it may have been given by its parent are closed in the child by file actions,
  looked up at each spawn (/proc/self/fd), so a command never holds one;
- restore_signals: SIGPIPE and SIGXFSZ, which Python ignores, back to their default;
- an exec that fails raises OSError, as Popen's does.

`spawn` returns None where it cannot do all that (no posix_spawn, or setsid, no /proc/self/fd, or a
pipe or the gate on a descriptor below 3, when the agent was started with one of 0-2 closed): the
caller then uses subprocess.Popen. Standard library only, like the rest of the agent.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Mapping

_FD_DIR = "/proc/self/fd"
_DEFAULT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name))
_WAIT_DELAY_MAX = 0.05  # seconds between exit checks in wait(timeout), as Popen's

_UNAVAILABLE: list[str] = []  # why posix_spawn cannot start the shells here, once found out


class Pipe:
    """The read end of an output pipe: what the runner uses of Popen's stdout (it reads the descriptor)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def fileno(self) -> int:
        if self.fd is None:
            raise ValueError("the pipe is closed")
        return self.fd

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __del__(self) -> None:
        self.close()


class Shell:
    """A spawned shell: its pid, its exit code once reaped (`returncode`), its output pipes."""

    def __init__(self, argv: list[str], pid: int, stdout: int, stderr: int) -> None:
        self.args = argv
        self.pid = pid
        self.returncode: int | None = None
        self.stdout = Pipe(stdout)
        self.stderr = Pipe(stderr)

    def poll(self) -> int | None:
        """Its exit code if it has exited (reaping it), else None."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: Popen's answer
                self.returncode = 0
                return 0
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Reap it, waiting up to `timeout` seconds (None: for good); raises subprocess.TimeoutExpired."""
        if self.returncode is not None:
            return self.returncode
        if timeout is None:
            try:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            except ChildProcessError:
                self.returncode = 0
            return self.returncode
        deadline, delay = time.monotonic() + timeout, 0.0005
        while self.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                import subprocess  # noqa: PLC0415 - only for its exception, where there is no pidfd

                raise subprocess.TimeoutExpired(self.args, timeout)
            delay = min(delay * 2, remaining, _WAIT_DELAY_MAX)
            time.sleep(delay)
        return self.returncode  # type: ignore[return-value]


def spawn(argv: list[str], gate_read: int, env: Mapping[str, str] | None) -> Shell | None:
    """Start argv[0] in a new session, `gate_read` as its input, its outputs to new pipes; None when
    posix_spawn cannot do it here (see the module). Raises OSError when the exec fails."""
    if _UNAVAILABLE or gate_read < 3:
        return None
    inherited = _inheritable_fds()
    if inherited is None:
        return None
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    if min(out_read, out_write, err_read, err_write) < 3:
        for fd in (out_read, out_write, err_read, err_write):
            os.close(fd)
        return None
    actions: list[tuple[Any, ...]] = [(os.POSIX_SPAWN_DUP2, gate_read, 0), (os.POSIX_SPAWN_DUP2, out_write, 1),
                                      (os.POSIX_SPAWN_DUP2, err_write, 2)]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in inherited]
    try:
        pid = os.posix_spawn(argv[0], argv, os.environ if env is None else env, file_actions=actions,
                             setsid=True, setsigdef=_DEFAULT_SIGNALS)
    except NotImplementedError as e:  # no POSIX_SPAWN_SETSID (glibc before 2.26)
        _UNAVAILABLE.append(str(e))
        os.close(out_read)
        os.close(err_read)
        return None
    except BaseException:
        os.close(out_read)
        os.close(err_read)
        raise
    finally:
        os.close(out_write)
        os.close(err_write)
    return Shell(argv, pid, out_read, err_read)


def _inheritable_fds() -> list[int] | None:
    """This process's inheritable descriptors above 2 (those it was given), None without /proc/self/fd."""
    if not hasattr(os, "posix_spawn"):
        _UNAVAILABLE.append("no os.posix_spawn")
        return None
    try:
        names = os.listdir(_FD_DIR)
    except OSError as e:
        _UNAVAILABLE.append(str(e))
        return None
    inheritable = []
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    inheritable.append(fd)
            except OSError:  # the directory's own descriptor, closed by now
                pass
    return inheritable
