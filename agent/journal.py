"""The agent's crash-safe memory of which jobs it has started and how they ended.

One append-only file, `journal.log`, in the agent's state directory: a line per record,

    <length> <crc32> <JSON object>\n

`length` is the JSON's size in bytes (decimal), `crc32` its CRC-32 (8 lowercase hex digits);
JSON escapes every newline inside strings, so a record is one line. Each change is ONE record,
appended with one write and made durable with fdatasync before the call returns: an append of a
few hundred bytes, not a rewrite of the file. After the records the file holds zeros, room for
the next ones written and synced ahead (ROOM_BYTES at a time): a record goes into that room, so
its fdatasync changes no metadata (not the file's size); zeros at the end are room, not a torn
record (no record holds a NUL byte). A record counts only whole: its newline, its length
and its checksum. A power cut can tear only the records after the last fdatasync, so bad records
at the end (a torn tail) are ignored; a bad record with good ones after it cannot come from a
power cut (each append is durable before the next one starts, and after a failed append the next
write rewrites the file), so it is damage: it is skipped, the file is kept aside as
`journal.log.damaged-<time>`, and the error logged.

Records, replayed in order:

    {"Version": 2, "Entries": N, "State": {...}}          the first record of a file: N entries follow
    {"Op": "Start", "Entry": {...}, "State": {...}}       a job started: its entry moves to the end
    {"Op": "Put", "Entry": {...}, "State": {...}}         an entry changed in place (or added at the end)
    {"State": {...}}                                      the state alone (a Floor, a key rotation)

An entry is {"JobId": ..., "Seq": ..., "StartTime": ..., "Result": {...} | null,
"Process": {"Pgid": ..., "BootId": ..., "StartTicks": ...}, "Attempt": 2} (Process while its command
runs, Attempt from 2 on). A State is {"HighestSeq": 17, "HighestAttempt": 2, "Floor": 16, "SeqScope":
["<a service public key, base64>", ...]}, each key only when it has a value (HighestAttempt when
above 1, SeqScope once there is a HighestSeq or a Floor): it replaces the state as a whole. Every
appended record carries the whole state, so a skipped record's HighestSeq is in the next one.

The file is compacted: the entries and the state written to a temp file as a header and one Put
per entry, fsync, rename over the journal, fsync of the directory, so after a crash the file is
the old journal or the new one, whole. That happens on the first write, once the appends since
the last compaction reach COMPACT_RECORDS_PER_ENTRY x max_entries records or the compacted size
(at least COMPACT_MIN_BYTES), on the next write after a failed one, and at start-up when the file
ends in a torn tail, holds damaged records, is a version 1 journal or has grown that far: appends
never follow a bad record, and start-up replays a bounded file. (A start-up with a sound file
writes nothing, so an agent restart costs no fsync.) A version 1 journal, `journal.json` (one
JSON document, each write a whole new file), is read once and compacted into `journal.log`, then
removed.

Entries are kept per attempt of a job: (JobId, Attempt), Attempt 1 when absent (the service
retries a failed attempt with a head that carries the next Attempt: docs/protocol.md). Attempt 2
of a job whose attempt 1 ran is a new entry, and runs; attempt 1 again finds its entry.

An entry is written ("started", Result null) before its command runs, with the command's
process group (Process) in the same record (the runner spawns the command's shell held at a
gate, and opens the gate only after this write; `record_process` adds it later for a caller
that did not spawn first), and is completed with the full final status message after (which
drops Process). A job with an entry is never run again. A restarted agent ends the group of a
"started" entry that still runs, and marks the entry "LeftoversStopped": true.

The journal keeps the last MAX_ENTRIES entries; of those, only the newest FULL_OUTPUT_ENTRIES
keep their Stdout/Stderr (older ones keep everything else, with the *Truncated flags set when
output was dropped), so the compacted file stays small even for chatty commands.

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

import binascii
import errno
import json
import logging
import os
import stat
import threading
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple

from . import protocol
from .protocol import Key

if TYPE_CHECKING:  # agent/runner.py is imported when an entry names a process group: see _process
    from .runner import ProcessGroup

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.log"
OLD_JOURNAL_FILE = "journal.json"  # version 1: read once, on the upgrade
FORMAT_VERSION = 2
OLD_FORMAT_VERSION = 1
MAX_ENTRIES = 200
FULL_OUTPUT_ENTRIES = 10
# Compact once this many records per kept entry were appended, or once the appends reach the
# compacted size (at least COMPACT_MIN_BYTES): start-up reads little, the file stays small.
COMPACT_RECORDS_PER_ENTRY = 2
COMPACT_MIN_BYTES = 1024 * 1024
# Zeros written (and synced) ahead of the records, as room for the next ones: a record written
# into room already on disk changes no metadata (the file's size stays), so its fdatasync writes
# the record's block alone instead of committing the file system's journal too (0.2 -> 0.1 ms
# quiet, and no wait behind other processes' commits when the disk is busy: bench/profile_notes.md,
# drain-mosquitto). A record that does not fit extends the file by this much room again.
ROOM_BYTES = 128 * 1024

# Keys of the journal's records that are not message keys.
_VERSION = "Version"
_ENTRIES = "Entries"
_OP = "Op"
_ENTRY = "Entry"
_STATE = "State"
_START = "Start"
_PUT = "Put"
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
    from .runner import ProcessGroup  # noqa: PLC0415 - lazily, see the imports at the top

    return ProcessGroup(*fields)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _State(NamedTuple):
    """What outlives the entries: HighestSeq and HighestAttempt, the Floor, and the keys they belong to."""

    highest_seq: int | None = None
    highest_attempt: int = 1
    floor: int | None = None
    seq_scope: Any = ()  # as read: a list of keys (an older journal's one key as a string)

    def to_json(self) -> dict[str, Any]:
        raw: dict[str, Any] = {}
        if self.highest_seq is not None:
            raw[_HIGHEST_SEQ] = self.highest_seq
            if self.highest_attempt != 1:
                raw[_HIGHEST_ATTEMPT] = self.highest_attempt
        if self.floor is not None:
            raw[_FLOOR] = self.floor
        if self.highest_seq is not None or self.floor is not None:
            raw[_SEQ_SCOPE] = list(_scope(self.seq_scope))
        return raw

    @classmethod
    def from_json(cls, raw: Any) -> _State:
        """The state of a version 2 State object, or of a version 1 document (the same keys)."""
        if not isinstance(raw, dict):
            raise _Unreadable(f"{_STATE} is not an object")
        highest, attempt, floor = raw.get(_HIGHEST_SEQ), raw.get(_HIGHEST_ATTEMPT, 1), raw.get(_FLOOR)
        for name, value in ((_HIGHEST_SEQ, highest), (_HIGHEST_ATTEMPT, attempt), (_FLOOR, floor)):
            if value is not None and not _whole(value):
                raise _Unreadable(f"{name} is not a whole number")
        return cls(highest, attempt, floor, raw.get(_SEQ_SCOPE))


class Journal:
    """The entries of one device's journal, in insertion order, backed by one append-only file.

    Writes may come from two threads (the main loop, and the job's worker recording its process
    group); a lock keeps each change and its record together.
    """

    def __init__(self, state_dir: Path, max_entries: int = MAX_ENTRIES, seq_scope: Iterable[str] = ()) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / JOURNAL_FILE
        self.old_path = self.state_dir / OLD_JOURNAL_FILE
        self.max_entries = max_entries
        self.seq_scope = _scope(seq_scope)  # what Seq and Floor belong to: the service's signing keys
        self._entries: dict[EntryKey, Entry] = {}
        self._highest_seq: int | None = None
        self._highest_attempt = 1  # of the job at HighestSeq
        self._floor: int | None = None
        self._encoding: dict[EntryKey, tuple[Entry, bytes]] = {}  # entry key -> (entry, its JSON), see _encoded
        self._state_encoding: tuple[tuple[Any, ...], bytes] | None = None  # the state and its JSON
        self._lock = threading.Lock()
        self._fd: int | None = None  # the journal file, open for writing records; None: none yet
        self._end = 0  # where the records end in the file (the next one goes there)
        self._size = 0  # the file's size: the records, then zeros (room for the next records)
        self._must_compact = False  # the next write rewrites the file (a failed write, a torn tail)
        self._appended = (0, 0)  # records and bytes appended since the last compaction
        self._compacted_bytes = 0
        self._remove_old = False  # a version 1 journal was read: remove it once the new one is written

    @classmethod
    def open(cls, state_dir: Path, max_entries: int = MAX_ENTRIES, seq_scope: Iterable[str] = ()) -> Journal:
        """Create the state directory (mode 0700) if needed and load the journal in it.

        A HighestSeq and Floor recorded under keys none of which is in seq_scope are forgotten.
        The file is compacted when it ends in a torn tail, holds damaged records, is a version 1
        journal or has grown past the bound (see the module); if that fails, the next write does it.
        Raises UnsafeDirectory for a directory another user could change (check_private_dir).
        """
        journal = cls(state_dir, max_entries, seq_scope)
        journal.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private_dir(journal.state_dir)
        journal._remove_temp_files()
        if journal._load():
            with journal._lock:
                try:
                    journal._compact()
                except JournalError as e:
                    log.warning("%s; writing it again with the next record", e)
        return journal

    def close(self) -> None:
        """Close the file (the journal is not written again)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

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
                self._write(None)
        return True

    def flush(self) -> None:
        """Write the state as it stands (a Floor raised in memory). Raises JournalError."""
        with self._lock:
            self._write(None)

    def rescope(self, seq_scope: Iterable[str]) -> None:
        """The agent now trusts these keys: keep HighestSeq and Floor if one of the old keys is
        still trusted (a rotation), else forget them. Raises JournalError."""
        scope = _scope(seq_scope)
        with self._lock:
            if not _same_service(scope, self.seq_scope):
                self._forget_seqs("none of the keys it trusted before is trusted now")
            self.seq_scope = scope
            self._write(None)

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
            _start(self._entries, entry)
            self._raise_highest_seq(seq, attempt)
            self._prune(entry.key)
            self._write(entry, _START)
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
            entry = self._entries[key] = entry._replace(**changes)
            self._write(entry, _PUT)

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
            self._prune(entry.key)
            entry = self._entries.get(entry.key, entry)
            self._write(entry, _PUT)
        return entry

    def _raise_highest_seq(self, seq: int | None, attempt: int) -> None:
        if seq is not None and (self.highest_run is None or (seq, attempt) > self.highest_run):
            self._highest_seq, self._highest_attempt = seq, attempt

    def _prune(self, changed: EntryKey) -> None:
        """Keep the newest max_entries entries, and output only in the newest FULL_OUTPUT_ENTRIES. Only
        the changed entry and the one it pushed past the newest FULL_OUTPUT_ENTRIES can hold output
        beyond them: every other has lost it already."""
        _cap(self._entries, self.max_entries)
        newest = list(_newest_keys(self._entries, FULL_OUTPUT_ENTRIES + 1))
        for key in {changed, *newest[FULL_OUTPUT_ENTRIES:]} - set(newest[:FULL_OUTPUT_ENTRIES]):
            if key in self._entries:
                self._entries[key] = self._entries[key].without_output()

    # --- the file ---------------------------------------------------------------------------

    def _state(self) -> _State:
        return _State(self._highest_seq, self._highest_attempt, self._floor, self.seq_scope)

    def _write(self, entry: Entry | None, op: str = _PUT) -> None:
        """Append one record (an entry's change and the state, or the state alone) and fdatasync it;
        compact instead when the file must be rewritten, and after it when it has grown enough."""
        if self._must_compact or self._fd is None:
            self._compact()
            return
        line = _frame(self._record(entry, op))
        data = line if self._end + len(line) <= self._size else line + bytes(ROOM_BYTES)  # room for more
        try:
            if os.pwrite(self._fd, data, self._end) != len(data):
                raise OSError(errno.ENOSPC, "a short write (the disk is full?)")
            os.fdatasync(self._fd)
        except OSError as e:
            self._must_compact = True  # the file may end in part of this record: never append after it
            raise JournalError(self.path, e) from e
        self._end, self._size = self._end + len(line), max(self._size, self._end + len(data))
        self._appended = (self._appended[0] + 1, self._appended[1] + len(line))
        if self._grown():
            try:
                self._compact()
            except JournalError as e:  # the record is durable: compacting can wait for the next write
                log.warning("%s; compacting it again with the next record", e)

    def _grown(self) -> bool:
        """Whether enough was appended since the last compaction to compact again."""
        records, size = self._appended
        return (records >= COMPACT_RECORDS_PER_ENTRY * self.max_entries
                or size >= max(COMPACT_MIN_BYTES, self._compacted_bytes))

    def _record(self, entry: Entry | None, op: str) -> bytes:
        state = b'"%s":%s' % (_STATE.encode(), self._encoded_state())
        if entry is None:
            return b"{%s}" % state
        return b'{"%s":"%s","%s":%s,%s}' % (_OP.encode(), op.encode(), _ENTRY.encode(), self._encoded(entry), state)

    def _compact(self) -> None:
        """Write the entries and the state to a new file, fsync it, rename it over the journal and
        fsync the directory; later records are appended to it. Raises JournalError."""
        header = b'{"%s":%d,"%s":%d,"%s":%s}' % (_VERSION.encode(), FORMAT_VERSION, _ENTRIES.encode(),
                                                  len(self._entries), _STATE.encode(), self._encoded_state())
        puts = (b'{"%s":"%s","%s":%s}' % (_OP.encode(), _PUT.encode(), _ENTRY.encode(), self._encoded(entry))
                for entry in self._entries.values())
        data = b"".join(_frame(body) for body in (header, *puts))
        temp = self.path.with_name(f"{JOURNAL_FILE}.{os.urandom(6).hex()}.tmp")
        try:
            fd = _write_new(temp, data + bytes(ROOM_BYTES), self.path)
        except OSError as e:
            raise JournalError(self.path, e) from e
        old, self._fd = self._fd, fd
        self._end, self._size = len(data), len(data) + ROOM_BYTES
        if old is not None:
            os.close(old)
        self._must_compact = True  # until the new name is durable, nothing may be appended to it
        try:
            _fsync_dir(self.state_dir)
        except OSError as e:
            raise JournalError(self.path, e) from e
        self._must_compact = False
        self._appended, self._compacted_bytes = (0, 0), len(data)
        if self._remove_old:
            self._remove_old_format()

    def _encoded(self, entry: Entry) -> bytes:
        """The entry as JSON, from the cache when this very entry was encoded before (entries are frozen)."""
        cached = self._encoding.get(entry.key)
        if cached is None or cached[0] is not entry:
            cached = (entry, _dumps(entry.to_json()))
            self._encoding[entry.key] = cached
        if len(self._encoding) > 2 * self.max_entries:  # drop what pruning removed
            self._encoding = {key: self._encoding[key] for key in self._entries if key in self._encoding}
        return cached[1]

    def _encoded_state(self) -> bytes:
        state = self._state()
        if self._state_encoding is None or self._state_encoding[0] != state:
            self._state_encoding = (state, _dumps(state.to_json()))
        return self._state_encoding[1]

    def _load(self) -> bool:
        """Read the journal (or a version 1 journal); whether the file must be compacted."""
        try:
            loaded = _Loaded.read(self.path, self.max_entries)
        except FileNotFoundError:
            return self._load_old()
        except (OSError, _Unreadable) as e:
            self._move_aside(self.path, e)
            return self._load_old()
        if loaded.damaged:
            aside = self._aside_name(self.path, "damaged")
            try:
                os.link(self.path, aside)
                kept = f"kept the file as {aside}"
            except OSError as e:
                kept = f"could not keep a copy as {aside}: {e}"
            log.error("journal %s: skipped %d damaged record(s) at byte(s) %s, followed by good ones (not a torn "
                      "write: the disk or someone changed the file); %s", self.path,
                      len(loaded.damaged), ", ".join(map(str, loaded.damaged)), kept)
        if loaded.torn is not None:
            log.warning("journal %s: ignored the torn or corrupt record(s) at its end, from byte %d (a write a "
                        "crash or power cut interrupted)", self.path, loaded.torn)
        if self.old_path.exists():  # left by a crash between the upgrade's rename and its removal
            self._remove_old = True
        self._adopt(loaded.entries, loaded.state)
        self._appended, self._compacted_bytes = loaded.appended, loaded.size - loaded.appended[1]
        if loaded.torn is not None or loaded.damaged or self._remove_old or self._grown():
            return True
        self._open_for_append(loaded.size, loaded.file_size)
        return False

    def _load_old(self) -> bool:
        """Read a version 1 journal, to be compacted into the new file (and then removed)."""
        try:
            entries, state = _parse_v1(_read_no_follow(self.old_path))
        except FileNotFoundError:
            return False
        except (OSError, _Unreadable) as e:
            self._move_aside(self.old_path, e)
            return False
        log.info("journal %s: upgrading the version 1 journal %s", self.path, self.old_path)
        self._remove_old = True
        self._adopt(entries, state)
        return True

    def _adopt(self, entries: dict[EntryKey, Entry], state: _State) -> None:
        self._entries = entries
        _cap(entries, self.max_entries)
        for key in list(entries)[: max(0, len(entries) - FULL_OUTPUT_ENTRIES)]:
            entries[key] = entries[key].without_output()
        self._highest_seq, self._highest_attempt, self._floor = state.highest_seq, state.highest_attempt, state.floor
        if not _same_service(_scope(state.seq_scope), self.seq_scope):
            self._forget_seqs("the service's signing key changed")

    def _open_for_append(self, end: int, size: int) -> None:
        """Open the file to write records from `end` on (not O_APPEND: they go into its room)."""
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            self._end, self._size = end, size
        except OSError as e:
            log.warning("journal %s: cannot open it for appending (%s); writing it anew with the next record",
                        self.path, e)

    def _remove_old_format(self) -> None:
        try:
            self.old_path.unlink(missing_ok=True)
            _fsync_dir(self.state_dir)
        except OSError as e:
            log.warning("journal %s: could not remove the version 1 journal %s: %s", self.path, self.old_path, e)
            return
        self._remove_old = False
        log.info("journal %s: the version 1 journal %s is now in it, and removed", self.path, self.old_path)

    def _aside_name(self, path: Path, why: str) -> Path:
        stamp = protocol.utc_now().strftime("%Y%m%dT%H%M%S.%fZ")
        return path.with_name(f"{path.name}.{why}-{stamp}")

    def _move_aside(self, path: Path, why: Exception) -> None:
        aside = self._aside_name(path, "corrupt")
        os.replace(path, aside)
        log.error("journal %s is unreadable (%s); moved it to %s and started an empty journal", path, why, aside)

    def _remove_temp_files(self) -> None:
        """Remove temp files left by a crash in the middle of a compaction (or a version 1 write)."""
        for name in (JOURNAL_FILE, OLD_JOURNAL_FILE):
            for leftover in self.state_dir.glob(f"{name}.*.tmp"):
                leftover.unlink(missing_ok=True)


class _Loaded(NamedTuple):
    """A version 2 journal file as read: its entries and state, and what was wrong with it."""

    entries: dict[EntryKey, Entry]
    state: _State
    size: int  # bytes of records (and of a torn tail): the file without its room
    file_size: int  # bytes, the room included
    appended: tuple[int, int]  # records and bytes after the compacted ones (the header's Entries)
    torn: int | None  # where the bad records at the end start, if any
    damaged: list[int]  # where the bad records with good ones after them start

    @classmethod
    def read(cls, path: Path, max_entries: int) -> _Loaded:
        """Replay the file's records, keeping the newest `max_entries` entries as the agent did;
        raises _Unreadable for a file with no good record, or of another version, or with a good
        record that is not one of the journal's."""
        whole = _read_no_follow(path)
        data = whole.rstrip(b"\0")  # the room: no record holds a NUL byte (JSON escapes it)
        entries: dict[EntryKey, Entry] = {}
        state, compacted, records, bad, damaged = _State(), 0, 0, [], []
        offset = compacted_end = 0
        for line in data.split(b"\n")[:-1]:  # the part after the last newline, if any, is torn
            body = _unframe(line)
            if body is None:
                bad.append(offset)
            else:
                damaged += bad
                bad = []
                records += 1
                state, compacted = _replay(_loads(body), entries, state, compacted, records)
                _cap(entries, max_entries)
            offset += len(line) + 1
            if records <= 1 + compacted:
                compacted_end = offset
        if offset < len(data):
            bad.append(offset)
        if records == 0:
            raise _Unreadable("it holds no whole record" if data else "it is empty")
        appended = (max(0, records - 1 - compacted), len(data) - compacted_end)
        return cls(entries, state, len(data), len(whole), appended, bad[0] if bad else None, damaged)


def _replay(record: Any, entries: dict[EntryKey, Entry], state: _State, compacted: int,
            number: int) -> tuple[_State, int]:
    """Apply one record to the entries; the state after it, and the header's count of entries."""
    if not isinstance(record, dict):
        raise _Unreadable("a record is not an object")
    if _VERSION in record:
        if record[_VERSION] != FORMAT_VERSION or number != 1:
            raise _Unreadable(f"not a version {FORMAT_VERSION} journal")
        compacted = record.get(_ENTRIES)
        if not _whole(compacted):
            raise _Unreadable(f"the header's {_ENTRIES} is not a whole number")
    if _STATE in record:
        state = _State.from_json(record[_STATE])
    op = record.get(_OP)
    if op == _START:
        _start(entries, Entry.from_json(record.get(_ENTRY)))
    elif op == _PUT:
        entry = Entry.from_json(record.get(_ENTRY))
        entries[entry.key] = entry
    elif op is not None or (_STATE not in record and _VERSION not in record):
        raise _Unreadable(f"a record of an unknown kind ({_OP} {op!r})")
    return state, compacted


def _start(entries: dict[EntryKey, Entry], entry: Entry) -> None:
    """A started entry goes to the end (the newest), even if its key was there before."""
    entries.pop(entry.key, None)
    entries[entry.key] = entry


def _cap(entries: dict[EntryKey, Entry], limit: int) -> None:
    """Drop the oldest entries beyond `limit`."""
    while len(entries) > limit:
        del entries[next(iter(entries))]


def _newest_keys(entries: dict[EntryKey, Entry], count: int) -> Iterable[EntryKey]:
    for n, key in enumerate(reversed(entries)):
        if n == count:
            return
        yield key


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise _Unreadable(f"a record is not UTF-8 JSON: {e}") from e


def _frame(body: bytes) -> bytes:
    """One record: its length, its CRC-32, the JSON, a newline."""
    return b"%d %08x %s\n" % (len(body), binascii.crc32(body), body)


def _unframe(line: bytes) -> bytes | None:
    """The JSON of a whole record (without its newline); None when its length or checksum is wrong."""
    length, _, rest = line.partition(b" ")
    crc, _, body = rest.partition(b" ")
    if length != b"%d" % len(body) or crc != b"%08x" % binascii.crc32(body):
        return None
    return body


def read_entries(state_dir: Path) -> list[dict[str, Any]]:
    """The entries of the journal in `state_dir` as JSON objects, oldest first, read without
    changing anything (for tests and tools; a torn tail is ignored): [] when there is none."""
    try:
        loaded = _Loaded.read(Path(state_dir) / JOURNAL_FILE, MAX_ENTRIES)
        return [entry.to_json() for entry in loaded.entries.values()]
    except FileNotFoundError:
        pass
    try:
        entries, _ = _parse_v1(_read_no_follow(Path(state_dir) / OLD_JOURNAL_FILE))
    except FileNotFoundError:
        return []
    return [entry.to_json() for entry in entries.values()]


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


def _parse_v1(data: bytes) -> tuple[dict[EntryKey, Entry], _State]:
    """A version 1 journal: one JSON document with the entries and the state's keys beside them."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _Unreadable(f"not UTF-8 JSON: {e}") from e
    if not isinstance(document, dict) or document.get(_VERSION) != OLD_FORMAT_VERSION:
        raise _Unreadable(f"not a version {OLD_FORMAT_VERSION} journal")
    raw_entries = document.get(_ENTRIES)
    if not isinstance(raw_entries, list):
        raise _Unreadable(f"{_ENTRIES} is not a list")
    entries = [Entry.from_json(raw) for raw in raw_entries]
    return {entry.key: entry for entry in entries}, _State.from_json(document)


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _dumps(value: Any) -> bytes:
    return _ENCODER.encode(value).encode("utf-8")


def _write_new(path: Path, data: bytes, target: Path) -> int:
    """Write `data` to a new file, fsync it and rename it to `target`; its descriptor, open for
    writing. Nothing is left behind when it fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.replace(path, target)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
