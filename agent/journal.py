"""The agent's crash-safe memory of which jobs it has started and how they ended.

One JSON file, `journal.json`, in the agent's state directory:

    {"Version": 1, "Entries": [{"JobId": ..., "Seq": ..., "StartTime": ..., "Result": {...} | null,
                                "Process": {"Pgid": ..., "BootId": ..., "StartTicks": ...},
                                "Attempt": 2}],
     "HighestSeq": 17, "HighestAttempt": 2, "Floor": 16, "SeqScope": ["<a service public key, base64>", ...]}

Entries are kept per attempt of a job: (JobId, Attempt), Attempt 1 when absent (the service
retries a failed attempt with a head that carries the next Attempt: docs/protocol.md). Attempt 2
of a job whose attempt 1 ran is a new entry, and runs; attempt 1 again finds its entry.

An entry is written ("started", Result null) before its command runs, with the command's
process group (Process) in the same write (the runner spawns the command's shell held at a
gate, and opens the gate only after this write; `record_process` adds it later for a caller
that did not spawn first), and is completed with the full final
status message after (which drops Process). A job with an entry is never run again. A restarted
agent ends the group of a "started" entry that still runs, and marks the entry
"LeftoversStopped": true. Every write replaces
the whole file atomically (temp file, fsync, rename, fsync of the directory), so after a crash
the file holds either the old or the new journal, never half of one.

The journal keeps the last MAX_ENTRIES entries; of those, only the newest FULL_OUTPUT_ENTRIES
keep their Stdout/Stderr (older ones keep everything else, with the *Truncated flags set when
output was dropped), so the file stays small even for chatty commands.

The agent refuses (UnsafeDirectory) a state or journal directory that is a symbolic link, is owned
by another user than the agent's, or that group or others may write: whoever could change the
journal could make a job run twice or hide one. It creates them with mode 0700.

HighestSeq is the highest Seq of a job the agent started (or refused by its local policy), and
HighestAttempt (1 when absent) the highest attempt of that Seq: the agent never runs a (Seq,
Attempt) below them. They survive the pruning of entries, so a replay of an old signed head is
refused even once its entry is gone. Floor is the highest Floor of a verified head: every Seq at or below it is done or
canceled on the service, so it never runs. An agent with a Floor "has state": it no longer
needs a head's IssuedAt to be recent. Both hold for the service whose keys are in SeqScope: they
are kept while the keys the agent trusts overlap SeqScope (a key rotation), and forgotten when
none is left (another service).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import tempfile
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from . import protocol
from .protocol import Key
from .runner import ProcessGroup

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.json"
FORMAT_VERSION = 1
MAX_ENTRIES = 200
FULL_OUTPUT_ENTRIES = 10

# Keys of the journal file that are not message keys.
_VERSION = "Version"
_ENTRIES = "Entries"
_RESULT = "Result"
_HIGHEST_SEQ = "HighestSeq"
_SEQ_SCOPE = "SeqScope"
_FLOOR = "Floor"
_PROCESS = "Process"
_PGID = "Pgid"
_BOOT_ID = "BootId"
_START_TICKS = "StartTicks"
_LEFTOVERS_STOPPED = "LeftoversStopped"
_HIGHEST_ATTEMPT = "HighestAttempt"
EntryKey = tuple[str, int]  # (JobId, Attempt)


class JournalError(Exception):
    """The journal could not be written; the agent must not run a job it cannot record."""

    def __init__(self, path: Path, cause: OSError) -> None:
        super().__init__(f"could not write the journal {path}: {cause}")
        self.path = path


class UnsafeDirectory(Exception):
    """A state or journal directory someone besides the agent's user could change."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"refusing the directory {path}: {problem}")
        self.path = path


def check_private_dir(path: Path) -> None:
    """Raise UnsafeDirectory unless `path` is a directory, not a symbolic link, owned by the
    agent's effective user, that neither group nor others may write. Raises OSError if it is missing."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeDirectory(path, "it is a symbolic link; give its real path")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectory(path, "it is not a directory")
    if info.st_uid != os.geteuid():
        raise UnsafeDirectory(path, f"it is owned by uid {info.st_uid}, not by the agent's user (uid {os.geteuid()})")
    if info.st_mode & 0o022:
        raise UnsafeDirectory(path, f"group or others may write it (mode {stat.S_IMODE(info.st_mode):04o}); "
                              "chmod go-w it")


class _Unreadable(Exception):
    """The journal file exists but is not a journal."""


class Entry(NamedTuple):
    """One job the agent has started; `result` is its final status message once it ended.

    `process`: the running command's group, until the result is recorded or the group is stopped
    after a restart (then `leftovers_stopped`).
    """

    job_id: str
    seq: int | None
    start_time: str
    result: dict[str, Any] | None = None
    process: ProcessGroup | None = None
    leftovers_stopped: bool = False
    attempt: int = 1

    @property
    def key(self) -> EntryKey:
        return self.job_id, self.attempt

    @property
    def start_datetime(self) -> datetime:
        return protocol.parse_time(self.start_time) or protocol.utc_now()

    def to_json(self) -> dict[str, Any]:
        raw = {Key.JOB_ID: self.job_id, Key.SEQ: self.seq, Key.START_TIME: self.start_time, _RESULT: self.result}
        if self.process is not None:
            p = self.process
            raw[_PROCESS] = {_PGID: p.pgid, _BOOT_ID: p.boot_id, _START_TICKS: p.start_ticks}
        if self.leftovers_stopped:
            raw[_LEFTOVERS_STOPPED] = True
        if self.attempt != 1:
            raw[Key.ATTEMPT] = self.attempt
        return raw

    @classmethod
    def from_json(cls, raw: Any) -> Entry:
        if not isinstance(raw, dict):
            raise _Unreadable("an entry is not an object")
        job_id, seq, start, result = (raw.get(k) for k in (Key.JOB_ID, Key.SEQ, Key.START_TIME, _RESULT))
        if not isinstance(job_id, str) or not isinstance(start, str):
            raise _Unreadable(f"entry {job_id!r} lacks {Key.JOB_ID} or {Key.START_TIME}")
        if not (seq is None or isinstance(seq, int)) or not (result is None or isinstance(result, dict)):
            raise _Unreadable(f"entry {job_id!r} has a bad {Key.SEQ} or {_RESULT}")
        attempt = raw.get(Key.ATTEMPT, 1)
        if not _whole(attempt) or attempt < 1:
            raise _Unreadable(f"entry {job_id!r} has a bad {Key.ATTEMPT}")
        return cls(job_id, seq, start, result, _process(raw.get(_PROCESS), job_id), raw.get(_LEFTOVERS_STOPPED) is True,
                   attempt)

    def without_output(self) -> Entry:
        """The same entry with its result's Stdout/Stderr dropped (flagged as truncated)."""
        if self.result is None or not (self.result.get(Key.STDOUT) or self.result.get(Key.STDERR)):
            return self  # nothing to drop: the same object, so its encoding stays cached
        result = dict(self.result)
        for text, flag in ((Key.STDOUT, Key.STDOUT_TRUNCATED), (Key.STDERR, Key.STDERR_TRUNCATED)):
            if result.get(text):
                result[text], result[flag] = "", True
        return self._replace(result=result)


def _process(raw: Any, job_id: str) -> ProcessGroup | None:
    if raw is None:
        return None
    fields = (raw.get(_PGID), raw.get(_BOOT_ID), raw.get(_START_TICKS)) if isinstance(raw, dict) else ()
    if len(fields) != 3 or not (_whole(fields[0]) and isinstance(fields[1], str) and _whole(fields[2])):
        raise _Unreadable(f"entry {job_id!r} has a bad {_PROCESS}")
    return ProcessGroup(*fields)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Journal:
    """The entries of one device's journal, in insertion order, backed by one file.

    Writes may come from two threads (the main loop, and the job's worker recording its process
    group); a lock keeps each change and its save together.
    """

    def __init__(self, state_dir: Path, max_entries: int = MAX_ENTRIES, seq_scope: Iterable[str] = ()) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / JOURNAL_FILE
        self.max_entries = max_entries
        self.seq_scope = _scope(seq_scope)  # what Seq and Floor belong to: the service's signing keys
        self._entries: dict[EntryKey, Entry] = {}
        self._highest_seq: int | None = None
        self._highest_attempt = 1  # of the job at HighestSeq
        self._floor: int | None = None
        self._encoding: dict[EntryKey, tuple[Entry, bytes]] = {}  # entry key -> (entry, its JSON), see _encoded
        self._lock = threading.Lock()

    @classmethod
    def open(cls, state_dir: Path, max_entries: int = MAX_ENTRIES, seq_scope: Iterable[str] = ()) -> Journal:
        """Create the state directory (mode 0700) if needed and load the journal in it.

        A HighestSeq and Floor recorded under keys none of which is in seq_scope are forgotten.
        Raises UnsafeDirectory for a directory another user could change (check_private_dir).
        """
        journal = cls(state_dir, max_entries, seq_scope)
        journal.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private_dir(journal.state_dir)
        journal._remove_temp_files()
        journal._entries, journal._highest_seq, journal._floor = journal._load()
        return journal

    @property
    def highest_run(self) -> tuple[int, int] | None:
        """(HighestSeq, HighestAttempt): no job below it runs; None: none yet."""
        return None if self._highest_seq is None else (self._highest_seq, self._highest_attempt)

    @property
    def highest_seq(self) -> int | None:
        """The highest Seq of a job started (or refused by the local policy); None: none yet."""
        return self._highest_seq

    @property
    def floor(self) -> int | None:
        """The highest Floor of a verified head; None: this agent has no state yet."""
        return self._floor

    def raise_floor(self, floor: int | None, durable: bool = True) -> bool:
        """Record a verified head's Floor if it is higher. Raises JournalError.

        durable=False keeps it in memory only: the caller's next write (`record_started`, which
        then makes the Floor and the start durable together, or `flush`) must come before it acts
        on the head, so the Floor is on disk before anything it guards happens.
        """
        with self._lock:
            if floor is None or (self._floor is not None and floor <= self._floor):
                return False
            self._floor = floor
            if durable:
                self._save()
        return True

    def flush(self) -> None:
        """Write the journal as it stands (a Floor raised in memory). Raises JournalError."""
        with self._lock:
            self._save()

    def rescope(self, seq_scope: Iterable[str]) -> None:
        """The agent now trusts these keys: keep HighestSeq and Floor if one of the old keys is
        still trusted (a rotation), else forget them. Raises JournalError."""
        scope = _scope(seq_scope)
        with self._lock:
            if not _same_service(scope, self.seq_scope):
                self._forget_seqs("none of the keys it trusted before is trusted now")
            self.seq_scope = scope
            self._save()

    def _forget_seqs(self, why: str) -> None:
        if self._highest_seq is not None or self._floor is not None:
            log.warning("journal %s: %s; forgetting the highest Seq run (%s) and the Floor (%s)",
                        self.path, why, self._highest_seq, self._floor)
        self._highest_seq = self._floor = None
        self._highest_attempt = 1

    def get(self, job_id: str, attempt: int = 1) -> Entry | None:
        return self._entries.get((job_id, attempt))

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def record_started(self, job_id: str, seq: int | None, start_time: datetime, attempt: int = 1,
                       process: ProcessGroup | None = None) -> Entry:
        """Record (durably) that the job's attempt is about to run, with a Floor raised in memory
        before, and its command's process group when it is already known (the runner spawns the
        command held at a gate, so the group is journalled in the same write before the command
        runs). Raises JournalError."""
        entry = Entry(job_id, seq, protocol.format_time(start_time) or "", process=process, attempt=attempt)
        with self._lock:
            self._entries.pop(entry.key, None)
            self._entries[entry.key] = entry
            self._raise_highest_seq(seq, attempt)
            self._prune()
            self._save()
        return entry

    def record_process(self, job_id: str, group: ProcessGroup, attempt: int = 1) -> None:
        """Record (durably) the process group of the started job's command. Raises JournalError."""
        self._update_started((job_id, attempt), process=group)

    def record_leftovers_stopped(self, job_id: str, attempt: int = 1) -> None:
        """Record (durably) that a restarted agent stopped what the job's command left running."""
        self._update_started((job_id, attempt), process=None, leftovers_stopped=True)

    def _update_started(self, key: EntryKey, **changes: Any) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.result is not None:
                return
            self._entries[key] = entry._replace(**changes)
            self._save()

    def record_result(self, job_id: str, message: dict[str, Any], seq: int | None = None,
                      attempt: int = 1) -> Entry:
        """Record (durably) the final status message of the job's attempt. Raises JournalError.

        A job never started (refused) takes `seq` as its Seq, which also raises HighestSeq.
        """
        with self._lock:
            old = self._entries.get((job_id, attempt))
            start = old.start_time if old else str(message.get(Key.START_TIME) or "")
            if old is None:
                self._raise_highest_seq(seq, attempt)
            entry = Entry(job_id, old.seq if old else seq, start, dict(message), attempt=attempt)
            self._entries[entry.key] = entry
            self._prune()
            self._save()
        return entry

    def _raise_highest_seq(self, seq: int | None, attempt: int) -> None:
        if seq is not None and (self.highest_run is None or (seq, attempt) > self.highest_run):
            self._highest_seq, self._highest_attempt = seq, attempt

    # --- the file ---------------------------------------------------------------------------

    def _prune(self) -> None:
        keys = list(self._entries)
        for key in keys[: max(0, len(keys) - self.max_entries)]:
            del self._entries[key]
        for key in list(self._entries)[: max(0, len(self._entries) - FULL_OUTPUT_ENTRIES)]:
            self._entries[key] = self._entries[key].without_output()

    def _save(self) -> None:
        """Write the whole journal; each entry's JSON is encoded once and reused while it is unchanged."""
        tail: dict[str, Any] = {}
        if self._highest_seq is not None:
            tail[_HIGHEST_SEQ] = self._highest_seq
            if self._highest_attempt != 1:
                tail[_HIGHEST_ATTEMPT] = self._highest_attempt
        if self._floor is not None:
            tail[_FLOOR] = self._floor
        if self._highest_seq is not None or self._floor is not None:
            tail[_SEQ_SCOPE] = list(self.seq_scope)
        entries = b",".join(self._encoded(entry) for entry in self._entries.values())
        data = b"".join([b'{"%s":%d,"%s":[' % (_VERSION.encode(), FORMAT_VERSION, _ENTRIES.encode()), entries, b"]",
                         *(b"," + _dumps(key) + b":" + _dumps(value) for key, value in tail.items()), b"}"])
        try:
            write_atomic(self.path, data)
        except OSError as e:
            raise JournalError(self.path, e) from e

    def _encoded(self, entry: Entry) -> bytes:
        """The entry as JSON, from the cache when this very entry was encoded before (entries are frozen)."""
        cached = self._encoding.get(entry.key)
        if cached is None or cached[0] is not entry:
            cached = (entry, _dumps(entry.to_json()))
            self._encoding[entry.key] = cached
        if len(self._encoding) > 2 * self.max_entries:  # drop what pruning removed
            self._encoding = {key: self._encoding[key] for key in self._entries if key in self._encoding}
        return cached[1]

    def _load(self) -> tuple[dict[EntryKey, Entry], int | None, int | None]:
        try:
            entries, (self._highest_seq, self._highest_attempt), self._floor, scope = _parse(_read_no_follow(self.path))
        except FileNotFoundError:
            return {}, None, None
        except (OSError, _Unreadable) as e:
            self._move_aside(e)
            return {}, None, None
        if not _same_service(_scope(scope), self.seq_scope):
            self._forget_seqs("the service's signing key changed")
        return {entry.key: entry for entry in entries[-self.max_entries:]}, self._highest_seq, self._floor

    def _move_aside(self, why: Exception) -> None:
        stamp = protocol.utc_now().strftime("%Y%m%dT%H%M%S.%fZ")
        aside = self.path.with_name(f"{JOURNAL_FILE}.corrupt-{stamp}")
        os.replace(self.path, aside)
        log.error("journal %s is unreadable (%s); moved it to %s and started an empty journal", self.path, why, aside)

    def _remove_temp_files(self) -> None:
        """Remove temp files left by a crash in the middle of a write."""
        for leftover in self.state_dir.glob(f"{JOURNAL_FILE}.*.tmp"):
            leftover.unlink(missing_ok=True)


def _read_no_follow(path: Path) -> bytes:
    """Read a file, refusing to follow a symlink out of the state directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _Unreadable("it is a symbolic link") from e
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _scope(value: Any) -> tuple[str, ...]:
    """A SeqScope: the keys (an older journal holds one key as a string)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(key for key in value if isinstance(key, str))
    return ()


def _same_service(one: tuple[str, ...], other: tuple[str, ...]) -> bool:
    """Whether two key sets belong to one service: they share a key (or are both empty)."""
    return bool(set(one) & set(other)) or set(one) == set(other)


def _parse(data: bytes) -> tuple[list[Entry], tuple[int | None, int], int | None, Any]:
    """The entries, (HighestSeq, HighestAttempt), the Floor (None when absent) and their SeqScope."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _Unreadable(f"not UTF-8 JSON: {e}") from e
    if not isinstance(document, dict) or document.get(_VERSION) != FORMAT_VERSION:
        raise _Unreadable(f"not a version {FORMAT_VERSION} journal")
    raw_entries = document.get(_ENTRIES)
    if not isinstance(raw_entries, list):
        raise _Unreadable(f"{_ENTRIES} is not a list")
    highest, attempt, floor = document.get(_HIGHEST_SEQ), document.get(_HIGHEST_ATTEMPT, 1), document.get(_FLOOR)
    for name, value in ((_HIGHEST_SEQ, highest), (_HIGHEST_ATTEMPT, attempt), (_FLOOR, floor)):
        if value is not None and not _whole(value):
            raise _Unreadable(f"{name} is not a whole number")
    return [Entry.from_json(raw) for raw in raw_entries], (highest, attempt), floor, document.get(_SEQ_SCOPE)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file, whole."""
    fd, temp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
