"""The agent's journal: durable, atomic, bounded, and safe with a broken file."""

import json
import logging
import os
import stat
import subprocess
import sys
import zlib
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent import journal as journal_module
from agent.journal import (
    FULL_OUTPUT_ENTRIES,
    JOURNAL_FILE,
    OLD_JOURNAL_FILE,
    Journal,
    JournalError,
    UnsafeDirectory,
    read_entries,
)
from agent.protocol import Key, utc_now
from agent.runner import ProcessGroup

START = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


def result_message(job_id, status="SUCCEEDED", stdout="out\n"):
    return {
        Key.JOB_ID: job_id, Key.STATUS: status, Key.EXIT_CODE: 0, Key.STDOUT: stdout, Key.STDERR: "",
        Key.STDOUT_TRUNCATED: False, Key.STDERR_TRUNCATED: False,
        Key.START_TIME: "2024-05-01T12:00:00.000Z", Key.END_TIME: "2024-05-01T12:00:01.000Z", Key.REASON: None,
    }


def test_state_dir_is_created_with_mode_0700(tmp_path):
    state = tmp_path / "state" / "dev-1"
    Journal.open(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_a_journal_dir_that_is_a_symlink_is_refused_and_nothing_is_written_through_it(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "dev-1").symlink_to(elsewhere)
    with pytest.raises(UnsafeDirectory, match="symbolic link"):
        Journal.open(tmp_path / "dev-1").record_started("job-1", 1, START)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777], ids=oct)
def test_a_journal_dir_group_or_others_may_write_is_refused(tmp_path, mode):
    state = tmp_path / "dev-1"
    state.mkdir()
    state.chmod(mode)
    with pytest.raises(UnsafeDirectory, match=f"group or others may write it \\(mode {mode:04o}\\)"):
        Journal.open(state)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a directory to another user")
def test_a_journal_dir_owned_by_another_user_is_refused(tmp_path):
    state = tmp_path / "dev-1"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    with pytest.raises(UnsafeDirectory, match="owned by uid 65534"):
        Journal.open(state)


REPO_ROOT = Path(__file__).resolve().parents[1]
KEY = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="  # RFC 8032 TEST 1's public key


def test_the_agent_exits_1_with_one_error_for_a_state_dir_that_is_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(real)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_AGENT_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run([sys.executable, "-m", "agent", "--broker", "mqtt://127.0.0.1:1", "--device-id", "dev-1",
                           "--server-key", KEY, "--state-dir", str(tmp_path / "state")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "symbolic link" in errors[0], done.stderr
    assert list(real.iterdir()) == []


def test_started_then_result_survive_a_reload(tmp_path):
    journal = Journal.open(tmp_path)
    journal.record_started("job-1", 7, START)

    started = Journal.open(tmp_path).get("job-1")
    assert (started.job_id, started.seq, started.start_time, started.result) == (
        "job-1", 7, "2024-05-01T12:00:00.000Z", None)

    journal.record_result("job-1", result_message("job-1"))
    finished = Journal.open(tmp_path).get("job-1")
    assert finished.result == result_message("job-1")
    assert finished.seq == 7
    assert finished.start_datetime == START


def test_an_unknown_job_is_not_in_the_journal(tmp_path):
    journal = Journal.open(tmp_path)
    journal.record_started("job-1", 1, START)
    assert journal.get("job-2") is None


def fd_path(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


def test_the_first_write_makes_the_file_through_a_synced_temp_file_then_each_change_is_one_synced_write_into_its_room(
        tmp_path, monkeypatch):
    calls = []
    real_fsync, real_fdatasync, real_replace, real_write = os.fsync, os.fdatasync, os.replace, os.write
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", fd_path(fd))), real_fsync(fd)))
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(("fdatasync", fd_path(fd))), real_fdatasync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (calls.append(("replace", str(src), str(dst))),
                                                         real_replace(src, dst)))
    monkeypatch.setattr(os, "write", lambda fd, data: (calls.append(("write", fd_path(fd))), real_write(fd, data))[1])
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: (calls.append(("write", fd_path(fd))),
                                                                real_pwrite(fd, data, offset))[1])
    journal = Journal.open(tmp_path)
    journal.record_started("job-1", 1, START)

    write, fsync_file, replace, fsync_dir = calls
    assert write[0] == "write" and fsync_file == ("fsync", write[1])
    assert os.path.dirname(fsync_file[1]) == str(tmp_path) and fsync_file[1].endswith(".tmp")
    assert replace == ("replace", fsync_file[1], str(tmp_path / JOURNAL_FILE))
    assert fsync_dir == ("fsync", str(tmp_path))

    calls.clear()
    size, records = (tmp_path / JOURNAL_FILE).stat().st_size, len(journal_lines(tmp_path / JOURNAL_FILE))
    journal.record_result("job-1", result_message("job-1"))
    assert calls == [("write", str(tmp_path / JOURNAL_FILE)), ("fdatasync", str(tmp_path / JOURNAL_FILE))]
    assert (tmp_path / JOURNAL_FILE).stat().st_size == size  # written into the room: no metadata changed
    assert len(journal_lines(tmp_path / JOURNAL_FILE)) == records + 1
    assert Journal.open(tmp_path).get("job-1").result == result_message("job-1")


def test_a_record_that_does_not_fit_the_room_extends_the_file_by_more_room(tmp_path):
    journal = Journal.open(tmp_path)
    journal.record_started("job-1", 1, START)
    size = (tmp_path / JOURNAL_FILE).stat().st_size
    big = {**result_message("job-1"), "Stdout": "x" * (size + 10)}  # more than the room left
    journal.record_result("job-1", big)
    grown = (tmp_path / JOURNAL_FILE).stat().st_size
    assert grown >= len(big["Stdout"]) + journal_module.ROOM_BYTES
    assert (tmp_path / JOURNAL_FILE).read_bytes().endswith(bytes(journal_module.ROOM_BYTES))
    journal.record_started("job-2", 2, START)  # into the new room
    assert (tmp_path / JOURNAL_FILE).stat().st_size == grown
    reloaded = Journal.open(tmp_path)
    assert reloaded.get("job-1").result == big and reloaded.get("job-2") is not None


def journal_lines(path):
    """The file's records, each checked: a length, a CRC-32 of the JSON, the JSON, a newline; then
    only zeros (the room for the next records)."""
    data = path.read_bytes().rstrip(b"\0")
    assert data.endswith(b"\n")
    records = []
    for line in data.split(b"\n")[:-1]:
        length, crc, body = line.split(b" ", 2)
        assert int(length) == len(body) and int(crc, 16) == zlib.crc32(body), line
        records.append(json.loads(body))
    return records


def test_a_failed_append_is_an_error_and_the_next_write_rewrites_the_file_whole(tmp_path, monkeypatch):
    journal = Journal.open(tmp_path)
    journal.record_started("job-1", 1, START)
    real_pwrite = os.pwrite

    def half_then_full_disk(fd, data, offset):  # the disk fails in the middle of the record
        return real_pwrite(fd, data[: len(data) // 2], offset)

    monkeypatch.setattr(os, "pwrite", half_then_full_disk)
    with pytest.raises(JournalError, match="short write"):
        journal.record_result("job-1", result_message("job-1"))
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert not (tmp_path / JOURNAL_FILE).read_bytes().rstrip(b"\0").endswith(b"\n")  # half a record, then room
    assert read_entries(tmp_path)[0]["Result"] is None  # ignored: the start stands

    journal.record_started("job-2", 2, START)  # the next write rewrites the file, with what failed
    journal_lines(tmp_path / JOURNAL_FILE)
    reloaded = Journal.open(tmp_path)
    assert reloaded.get("job-1").result == result_message("job-1") and reloaded.get("job-2") is not None


def test_a_failed_fdatasync_is_an_error_and_the_next_write_rewrites_the_file(tmp_path, monkeypatch):
    journal = Journal.open(tmp_path)
    journal.record_started("job-1", 1, START)
    inode = (tmp_path / JOURNAL_FILE).stat().st_ino

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(JournalError, match="Input/output error"):
        journal.record_started("job-2", 2, START)
    monkeypatch.undo()
    journal.record_started("job-3", 3, START)
    assert (tmp_path / JOURNAL_FILE).stat().st_ino != inode  # a new file: nothing appended after the failure
    assert [entry["JobId"] for entry in read_entries(tmp_path)] == ["job-1", "job-2", "job-3"]


def test_a_failed_compaction_keeps_the_old_journal_and_leaves_no_temp_file(tmp_path, monkeypatch):
    journal = Journal.open(tmp_path)
    journal.record_started("job-1", 1, START)
    monkeypatch.setattr(os, "fdatasync", lambda fd: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with pytest.raises(JournalError):
        journal.record_started("job-2", 2, START)
    monkeypatch.undo()
    before = (tmp_path / JOURNAL_FILE).read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(JournalError, match="No space left on device"):
        journal.record_result("job-1", result_message("job-1"))
    assert (tmp_path / JOURNAL_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [JOURNAL_FILE]
    monkeypatch.undo()
    journal.flush()
    assert Journal.open(tmp_path).get("job-1").result == result_message("job-1")


def test_temp_files_left_by_a_crash_are_removed_on_open(tmp_path):
    Journal.open(tmp_path).record_started("job-1", 1, START)
    (tmp_path / f"{JOURNAL_FILE}.abc123.tmp").write_text("half a journal")
    journal = Journal.open(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [JOURNAL_FILE]
    assert journal.get("job-1") is not None


def test_pruning_keeps_only_the_last_entries_by_insertion(tmp_path):
    journal = Journal.open(tmp_path, max_entries=200)
    for n in range(205):
        journal.record_started(f"job-{n}", n, START)
    journal.record_result("job-10", result_message("job-10"))  # an update does not move an entry

    reloaded = Journal.open(tmp_path)
    ids = [entry.job_id for entry in reloaded.entries()]
    assert len(ids) == 200
    assert ids[0] == "job-5" and ids[-1] == "job-204"
    assert reloaded.get("job-4") is None


def test_the_highest_seq_run_outlives_pruning_and_restarts(tmp_path):
    journal = Journal.open(tmp_path, max_entries=2, seq_scope="key")
    assert journal.highest_seq is None
    for seq in (3, 9, 4):
        journal.record_started(f"job-{seq}", seq, START)
    assert journal.get("job-9") is not None and journal.highest_seq == 9
    journal.record_started("job-5", 5, START)  # job-9 is pruned now
    assert journal.get("job-9") is None
    assert Journal.open(tmp_path, seq_scope="key").highest_seq == 9


def test_a_refused_job_keeps_its_seq_and_raises_the_highest(tmp_path):
    journal = Journal.open(tmp_path)
    journal.record_started("job-1", 1, START)
    journal.record_result("job-2", result_message("job-2", status="REJECTED"), seq=7)
    journal.record_result("job-1", result_message("job-1"), seq=99)  # a started job keeps the Seq it has
    reloaded = Journal.open(tmp_path)
    assert (reloaded.get("job-2").seq, reloaded.get("job-1").seq, reloaded.highest_seq) == (7, 1, 7)


def test_old_entries_lose_their_output_but_keep_their_status(tmp_path):
    journal = Journal.open(tmp_path)
    for n in range(FULL_OUTPUT_ENTRIES + 1):
        journal.record_started(f"job-{n}", n, START)
        journal.record_result(f"job-{n}", result_message(f"job-{n}", stdout=f"output {n}"))

    reloaded = Journal.open(tmp_path)
    oldest, newest = reloaded.get("job-0").result, reloaded.get(f"job-{FULL_OUTPUT_ENTRIES}").result
    assert (oldest[Key.STATUS], oldest[Key.STDOUT], oldest[Key.STDOUT_TRUNCATED]) == ("SUCCEEDED", "", True)
    assert oldest[Key.STDERR_TRUNCATED] is False  # it had no stderr to drop
    assert newest[Key.STDOUT] == f"output {FULL_OUTPUT_ENTRIES}"
    assert reloaded.get("job-1").result[Key.STDOUT] == "output 1"


def framed(*records):
    """A version 2 journal file holding these records (dicts, or raw JSON bytes)."""
    bodies = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    return b"".join(b"%d %08x %s\n" % (len(body), zlib.crc32(body), body) for body in bodies)


HEADER = {"Version": 2, "Entries": 0, "State": {}}
ENTRY_1 = {"JobId": "job-1", "Seq": 1, "StartTime": "2024-05-01T12:00:00.000Z", "Result": None}


@pytest.mark.parametrize("name, content", [
    *((OLD_JOURNAL_FILE, content) for content in (
        b"{not json", b"\xff\xfe", b"[]", b'{"Version": 1, "Entries": [{"Seq": 1}]}', b'{"Version": 99, "Entries": []}',
        b'{"Version": 1, "Entries": [], "HighestSeq": "7"}')),
    (JOURNAL_FILE, b""), (JOURNAL_FILE, b"{not json\n"), (JOURNAL_FILE, b'{"Version": 1, "Entries": []}'),
    (JOURNAL_FILE, framed(b"[]")), (JOURNAL_FILE, framed(b"{not json")), (JOURNAL_FILE, framed(b"\xff\xfe")),
    (JOURNAL_FILE, framed({**HEADER, "Version": 99})),
    (JOURNAL_FILE, framed(HEADER, {"Op": "Start", "Entry": {"Seq": 1}})),
    (JOURNAL_FILE, framed(HEADER, {"Op": "Move", "Entry": ENTRY_1})),
    (JOURNAL_FILE, framed(HEADER, {"State": {"HighestSeq": "7"}})), (JOURNAL_FILE, framed(HEADER, HEADER)),
], ids=lambda value: value if isinstance(value, str) else None)
def test_a_corrupt_journal_is_moved_aside_and_the_agent_starts_empty(tmp_path, caplog, name, content):
    (tmp_path / name).write_bytes(content)
    with caplog.at_level(logging.ERROR, logger=journal_module.__name__):
        journal = Journal.open(tmp_path)

    assert len(journal) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f"{name}.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert not (tmp_path / name).exists() and not (tmp_path / JOURNAL_FILE).exists()
    assert "unreadable" in caplog.text and aside[0].name in caplog.text
    journal.record_started("job-1", 1, START)
    assert Journal.open(tmp_path).get("job-1") is not None


@pytest.mark.parametrize("name, content", [(OLD_JOURNAL_FILE, json.dumps({"Version": 1, "Entries": []}).encode()),
                                           (JOURNAL_FILE, framed(HEADER))])
def test_a_symlinked_journal_is_not_followed_out_of_the_state_dir(tmp_path, name, content):
    outside = tmp_path / "outside"
    outside.write_bytes(content)
    state = tmp_path / "state"
    state.mkdir()
    (state / name).symlink_to(outside)

    journal = Journal.open(state)
    journal.record_started("job-1", 1, START)
    journal.record_started("job-2", 2, START)

    assert outside.read_bytes() == content
    assert not (state / JOURNAL_FILE).is_symlink() and not (state / name).is_symlink()
    assert any(p.name.startswith(f"{name}.corrupt-") for p in state.iterdir())


GROUP = ProcessGroup(pgid=4242, boot_id="5f2c1e2a-0d1b-4c4e-9a43-3e0f7c1b2d11", start_ticks=987654)


def test_a_started_jobs_process_group_survives_a_reload_until_its_result(tmp_path):
    journal = Journal.open(tmp_path)
    journal.record_started("job-1", 1, START)
    journal.record_process("job-1", GROUP)
    assert Journal.open(tmp_path).get("job-1").process == GROUP

    journal.record_result("job-1", result_message("job-1"))
    assert Journal.open(tmp_path).get("job-1").process is None


def test_stopped_leftovers_are_recorded_and_the_group_forgotten(tmp_path):
    journal = Journal.open(tmp_path)
    journal.record_started("job-1", 1, START)
    journal.record_process("job-1", GROUP)
    journal.record_leftovers_stopped("job-1")

    entry = Journal.open(tmp_path).get("job-1")
    assert (entry.process, entry.leftovers_stopped, entry.result) == (None, True, None)


def test_a_process_group_is_not_recorded_for_a_finished_job(tmp_path):
    journal = Journal.open(tmp_path)
    journal.record_started("job-1", 1, START)
    journal.record_result("job-1", result_message("job-1"))
    journal.record_process("job-1", GROUP)
    assert Journal.open(tmp_path).get("job-1").process is None


@pytest.mark.parametrize("version", [1, 2])
def test_a_bad_process_group_makes_the_journal_unreadable(tmp_path, caplog, version):
    entry = {**ENTRY_1, "Process": {"Pgid": "4242", "BootId": "x", "StartTicks": 1}}
    if version == 1:
        (tmp_path / OLD_JOURNAL_FILE).write_text(json.dumps({"Version": 1, "Entries": [entry]}))
    else:
        (tmp_path / JOURNAL_FILE).write_bytes(framed({**HEADER, "Entries": 1}, {"Op": "Put", "Entry": entry}))
    with caplog.at_level(logging.ERROR):
        assert len(Journal.open(tmp_path)) == 0
    assert "bad Process" in caplog.text


def test_each_attempt_of_a_job_has_its_own_entry_and_the_highest_run_counts_attempts(tmp_path):
    journal = Journal.open(tmp_path)
    journal.record_started("j1", 5, utc_now())
    journal.record_result("j1", result_message("j1", "FAILED"))
    assert journal.get("j1", 2) is None  # attempt 2 of a job that ran is runnable
    journal.record_started("j1", 5, utc_now(), attempt=2)
    journal.record_result("j1", {**result_message("j1"), "Attempt": 2}, attempt=2)

    reloaded = Journal.open(tmp_path)
    assert reloaded.get("j1").result[Key.STATUS] == "FAILED"  # a replayed attempt 1 finds its own result
    assert reloaded.get("j1", 2).result == {**result_message("j1"), "Attempt": 2}
    assert reloaded.highest_run == (5, 2)


def test_the_highest_attempt_outlives_pruning(tmp_path):
    journal = Journal.open(tmp_path, max_entries=1)
    journal.record_started("j1", 5, utc_now(), attempt=1)
    journal.record_started("j1", 5, utc_now(), attempt=3)
    journal.record_started("j0", 4, utc_now())  # an older Seq does not lower it
    reloaded = Journal.open(tmp_path, max_entries=1)
    assert reloaded.get("j1") is None and reloaded.get("j1", 3) is None
    assert reloaded.highest_run == (5, 3)


def test_a_floor_raised_in_memory_is_written_with_the_start_or_by_flush(tmp_path):
    journal = Journal.open(tmp_path)
    assert journal.raise_floor(4) and Journal.open(tmp_path).floor == 4
    assert journal.raise_floor(7, durable=False) and journal.floor == 7
    assert Journal.open(tmp_path).floor == 4  # not on disk yet: nothing acted on it
    journal.record_started("job-8", 8, START)
    reopened = Journal.open(tmp_path)
    assert reopened.floor == 7 and reopened.get("job-8") is not None  # one write, both durable
    journal.raise_floor(9, durable=False)
    journal.flush()
    assert Journal.open(tmp_path).floor == 9


# --- the append-only file: torn tails, damage, compaction, the upgrade from version 1 ---------


def three_jobs(state):
    """A journal with job-1 done, job-2 done, job-3 started (Floor 2). Its records: 0 the header, 1 job-1's
    start (the first write makes the file), then appended: 2 job-1's result, 3 job-2's start, 4 its result,
    5 the Floor, 6 job-3's start."""
    journal = Journal.open(state, seq_scope="key")
    for seq in (1, 2):
        journal.raise_floor(seq - 1 or None, durable=False)
        journal.record_started(f"job-{seq}", seq, START, process=GROUP)
        journal.record_result(f"job-{seq}", result_message(f"job-{seq}"))
    journal.raise_floor(2)
    journal.record_started("job-3", 3, START, process=GROUP)
    journal.close()
    return (tmp := state / JOURNAL_FILE).read_bytes().rstrip(b"\0"), tmp  # the records, without the room


def summary(journal):
    return ([(e.job_id, e.seq, e.result is not None, e.process) for e in journal.entries()], journal.highest_run,
            journal.floor)


DONE = [("job-1", 1, True, None), ("job-2", 2, True, None)]


@pytest.mark.parametrize("room", [True, False], ids=["in-the-room", "at-the-end"])
@pytest.mark.parametrize("cut", [1, 2, 10, -20, -2, -1], ids=lambda cut: f"cut{cut}")
def test_a_torn_last_record_is_ignored_and_the_file_rewritten_without_it(tmp_path, caplog, cut, room):
    """A power cut in the middle of an append leaves part of the record (never acted on: its
    fdatasync had not returned), followed by the room's zeros (or, in a file without room, at the
    end); the records before it stand."""
    data, path = three_jobs(tmp_path)
    last = data.rindex(b"\n", 0, len(data) - 1) + 1
    torn = data[: last + cut] if cut > 0 else data[:cut]  # -1: all but the newline
    path.write_bytes(torn + bytes(len(data) - len(torn) + 4096) if room else torn)
    with caplog.at_level(logging.WARNING, logger=journal_module.__name__):
        journal = Journal.open(tmp_path, seq_scope="key")

    assert summary(journal) == (DONE, (2, 1), 2)
    assert f"torn or corrupt record(s) at its end, from byte {last}" in caplog.text
    assert len(journal_lines(path)) == 1 + 2  # compacted at start-up: the header, two entries, no torn bytes
    journal.record_started("job-3", 3, START)
    assert summary(Journal.open(tmp_path, seq_scope="key"))[0] == [*DONE, ("job-3", 3, False, None)]


@pytest.mark.parametrize("tail", [b"\0" * 300 + b"\n", b"garbage\n", b"12 00000000 {}\n", b"garbage\n" + bytes(300)],
                         ids=["zeros-line", "garbage", "bad-crc", "garbage-then-room"])
def test_a_tail_of_garbage_after_a_power_cut_is_ignored(tmp_path, caplog, tail):
    data, path = three_jobs(tmp_path)
    path.write_bytes(data + tail)
    with caplog.at_level(logging.WARNING, logger=journal_module.__name__):
        journal = Journal.open(tmp_path, seq_scope="key")
    assert summary(journal) == ([*DONE, ("job-3", 3, False, GROUP)], (3, 1), 2)
    assert f"from byte {len(data)}" in caplog.text
    assert len(journal_lines(path)) == 1 + 3 and b"garbage" not in path.read_bytes()


@pytest.mark.parametrize("zeros", [300, 0], ids=["room", "none"])
def test_zeros_after_the_last_record_are_room_not_a_torn_record(tmp_path, caplog, zeros):
    """The room an agent writes ahead, or what a power cut leaves of a record whose fdatasync never
    returned (zeros, never acted on): nothing is rewritten at start-up, the next record goes there."""
    data, path = three_jobs(tmp_path)
    path.write_bytes(data + bytes(zeros))
    inode = path.stat().st_ino
    with caplog.at_level(logging.WARNING, logger=journal_module.__name__):
        journal = Journal.open(tmp_path, seq_scope="key")
    assert summary(journal) == ([*DONE, ("job-3", 3, False, GROUP)], (3, 1), 2)
    assert caplog.text == "" and path.stat().st_ino == inode and path.read_bytes() == data + bytes(zeros)
    journal.record_result("job-3", result_message("job-3"))
    assert path.read_bytes().startswith(data) and len(journal_lines(path)) == 1 + 6 + 1
    assert summary(Journal.open(tmp_path, seq_scope="key"))[0] == [*DONE, ("job-3", 3, True, None)]


class _WithoutRoom(bytes):
    """The file as an agent from before the room (86b5c15) read it: its reader did not strip the zeros."""

    def rstrip(self, chars=None):
        return bytes(self)


def test_a_downgraded_agent_reads_the_room_as_a_torn_tail_keeps_every_record_and_upgrades_back(
        tmp_path, caplog, monkeypatch):
    """docs/guarantees.md, 1.1: an older agent reading a journal with room loses nothing. Its reader
    (the same but for the zeros, which it sees as a record cut short after the last newline) keeps
    every entry, HighestSeq and Floor, warns and rewrites the file without the zeros; the newer agent
    then reads what the older one appended."""
    data, path = three_jobs(tmp_path)
    whole = path.read_bytes()
    assert data.endswith(b"\n") and b"\0" not in data and whole == data + bytes(len(whole) - len(data))  # then room
    newer = summary(Journal.open(tmp_path, seq_scope="key"))
    read_no_follow = journal_module._read_no_follow
    with monkeypatch.context() as old, caplog.at_level(logging.WARNING, logger=journal_module.__name__):
        old.setattr(journal_module, "_read_no_follow", lambda p: _WithoutRoom(read_no_follow(p)))
        older = Journal.open(tmp_path, seq_scope="key")
        assert summary(older) == newer == ([*DONE, ("job-3", 3, False, GROUP)], (3, 1), 2)
        assert f"torn or corrupt record(s) at its end, from byte {len(data)}" in caplog.text
        older.record_result("job-3", result_message("job-3"))
        older.close()
    upgraded = Journal.open(tmp_path, seq_scope="key")
    assert summary(upgraded) == ([*DONE, ("job-3", 3, True, None)], (3, 1), 2)


def flip(data, record, needle):
    """`data` with one byte changed inside the given record (0: the header) at `needle`."""
    start = 0
    for _ in range(record):
        start = data.index(b"\n", start) + 1
    at = data.index(needle, start)
    assert at < data.index(b"\n", start)
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


@pytest.mark.parametrize("records, kept", [
    ((3, 5), [*DONE, ("job-3", 3, False, GROUP)]),  # job-2's start and the Floor: the next records restore both
    ((4,), [("job-1", 1, True, None), ("job-2", 2, False, GROUP), ("job-3", 3, False, GROUP)]),  # job-2's result
], ids=["start-and-floor", "result"])
def test_a_damaged_record_between_good_ones_is_skipped_kept_aside_and_logged(tmp_path, caplog, records, kept):
    """Not a power cut: only disk damage (or a person) changes a record that has good ones after it.
    The rest is kept: an entry's record holds the whole entry, and each appended one the whole state."""
    data, path = three_jobs(tmp_path)
    damaged = data
    for record in records:
        damaged = flip(damaged, record, b'"')
    path.write_bytes(damaged)
    with caplog.at_level(logging.ERROR, logger=journal_module.__name__):
        journal = Journal.open(tmp_path, seq_scope="key")

    assert summary(journal) == (kept, (3, 1), 2)
    assert f"skipped {len(records)} damaged record(s)" in caplog.text
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f"{JOURNAL_FILE}.damaged-")]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged
    assert len(journal_lines(path)) == 1 + len(kept)


def test_a_damaged_length_is_a_damaged_record(tmp_path, caplog):
    data, path = three_jobs(tmp_path)
    second = data.index(b"\n") + 1
    path.write_bytes(data[:second] + b"9" + data[second:])  # the first entry record's length
    with caplog.at_level(logging.ERROR, logger=journal_module.__name__):
        journal = Journal.open(tmp_path, seq_scope="key")
    assert "skipped 1 damaged record(s) at byte(s) " + str(second) in caplog.text
    assert summary(journal)[1:] == ((3, 1), 2) and journal.get("job-3") is not None


def test_a_sound_file_is_not_rewritten_at_start_up_and_appends_go_on_after_it(tmp_path):
    _, path = three_jobs(tmp_path)
    inode, size, records = path.stat().st_ino, path.stat().st_size, len(journal_lines(path))
    journal = Journal.open(tmp_path, seq_scope="key")
    assert (path.stat().st_ino, path.stat().st_size) == (inode, size)
    journal.record_result("job-3", result_message("job-3"))
    assert path.stat().st_ino == inode and path.stat().st_size == size  # into the room
    assert len(journal_lines(path)) == records + 1
    assert summary(Journal.open(tmp_path, seq_scope="key"))[0] == [*DONE, ("job-3", 3, True, None)]


def test_the_file_is_compacted_once_it_has_grown_and_keeps_what_the_agent_holds(tmp_path):
    journal = Journal.open(tmp_path, max_entries=5, seq_scope="key")
    lines = []
    for n in range(40):
        journal.record_started(f"job-{n}", n, START)
        journal.record_result(f"job-{n}", result_message(f"job-{n}", stdout=f"output {n}"))
        lines.append(len(journal_lines(tmp_path / JOURNAL_FILE)))
    assert max(lines) <= 1 + 5 + 2 * 5  # the compacted entries, then less than 2 x max_entries appended
    assert sum(later < earlier for earlier, later in zip(lines, lines[1:], strict=False)) >= 6  # compacted, often
    reloaded = Journal.open(tmp_path, max_entries=5, seq_scope="key")
    assert [e.job_id for e in reloaded.entries()] == [e.job_id for e in journal.entries()]
    assert [e.result for e in reloaded.entries()] == [e.result for e in journal.entries()]
    assert reloaded.highest_run == (39, 1)


def test_replaying_the_records_gives_what_the_agent_held_pruning_and_output_included(tmp_path):
    """Without a compaction in between: every record replayed, pruning as the agent pruned."""
    journal = Journal.open(tmp_path, max_entries=12, seq_scope="key")
    for n in range(16):  # job-0 to job-3 pruned
        journal.record_started(f"job-{n}", n, START, process=GROUP)
    for n in (10, 5, 6, 8, 9, 4, 7):  # in place, not moved
        journal.record_result(f"job-{n}", result_message(f"job-{n}", stdout=f"output {n}"))
    journal.record_result("job-0", result_message("job-0", status="REJECTED"), seq=0)  # pruned: back, at the end
    assert len(journal_lines(tmp_path / JOURNAL_FILE)) == 1 + 1 + 15 + 7 + 1  # the first write made the file
    reloaded = Journal.open(tmp_path, max_entries=12, seq_scope="key")
    assert reloaded.entries() == journal.entries()
    assert [e.job_id for e in reloaded.entries()] == [*(f"job-{n}" for n in range(5, 16)), "job-0"]
    assert [e.result and e.result[Key.STDOUT] for e in reloaded.entries()][:4] == ["", "", "output 7", "output 8"]


# A child process that writes a journal and is SIGKILLed at one step of the compaction its
# fifth append starts (max_entries=2: compaction after four appended records).
KILLED_COMPACTION = """
import os, signal, sys
from datetime import datetime, timezone
from agent.journal import Journal
from agent.runner import ProcessGroup

state, step = sys.argv[1], sys.argv[2]
start = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
journal = Journal.open(state, max_entries=2, seq_scope="key")
journal.raise_floor(1)
journal.record_started("job-2", 2, start, process=ProcessGroup(1, "b", 2))
journal.record_result("job-2", {"JobId": "job-2", "Status": "SUCCEEDED"})
journal.record_started("job-3", 3, start, process=ProcessGroup(1, "b", 3))

real = {name: getattr(os, name) for name in ("write", "fsync", "replace")}
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def fsync(fd):
    if step == "before-fsync" and os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
        die()
    if step == "before-dir-fsync" and os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
        die()
    real["fsync"](fd)
def replace(src, dst):
    if step == "before-rename":
        die()
    real["replace"](src, dst)
    if step == "after-rename":
        die()
os.fsync, os.replace = fsync, replace
journal.record_result("job-3", {"JobId": "job-3", "Status": "FAILED"})
if step == "after-dir-fsync":
    die()
print("not killed")
"""


@pytest.mark.parametrize("step", ["before-fsync", "before-rename", "after-rename", "before-dir-fsync",
                                  "after-dir-fsync"])
def test_an_agent_killed_at_any_step_of_a_compaction_loses_nothing(tmp_path, step):
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", KILLED_COMPACTION, str(state), step], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stdout + done.stderr

    journal = Journal.open(state, max_entries=2, seq_scope="key")
    assert sorted(p.name for p in state.iterdir()) == [JOURNAL_FILE]  # a leftover temp file is removed
    assert [(e.job_id, e.result and e.result["Status"], e.process) for e in journal.entries()] == [
        ("job-2", "SUCCEEDED", None), ("job-3", "FAILED", None)]
    assert (journal.highest_run, journal.floor) == ((3, 1), 1)
    journal.record_started("job-4", 4, START)
    assert [e.job_id for e in Journal.open(state, max_entries=2, seq_scope="key").entries()] == ["job-3", "job-4"]


V1_ENTRIES = [
    {"JobId": "job-1", "Seq": 5, "StartTime": "2024-05-01T12:00:00.000Z", "Result": result_message("job-1")},
    {"JobId": "job-1", "Seq": 5, "StartTime": "2024-05-01T12:00:02.000Z", "Result": None, "Attempt": 2,
     "Process": {"Pgid": 4242, "BootId": GROUP.boot_id, "StartTicks": 987654}},
    {"JobId": "job-0", "Seq": 4, "StartTime": "2024-05-01T11:00:00.000Z", "Result": None, "LeftoversStopped": True},
]
V1_JOURNAL = {"Version": 1, "Entries": V1_ENTRIES, "HighestSeq": 5, "HighestAttempt": 2, "Floor": 3,
              "SeqScope": "key"}  # an older journal's SeqScope: one key as a string


def test_a_version_1_journal_is_read_compacted_into_the_new_file_and_removed(tmp_path, caplog):
    (tmp_path / OLD_JOURNAL_FILE).write_text(json.dumps(V1_JOURNAL))
    with caplog.at_level(logging.INFO, logger=journal_module.__name__):
        journal = Journal.open(tmp_path, seq_scope=["key", "new key"])

    assert [e.to_json() for e in journal.entries()] == V1_ENTRIES
    assert (journal.highest_run, journal.floor) == ((5, 2), 3)
    assert journal.get("job-1", 2).process == GROUP and journal.get("job-0").leftovers_stopped
    assert sorted(p.name for p in tmp_path.iterdir()) == [JOURNAL_FILE]
    assert "upgrading the version 1 journal" in caplog.text
    records = journal_lines(tmp_path / JOURNAL_FILE)
    assert records[0] == {"Version": 2, "Entries": 3,
                          "State": {"HighestSeq": 5, "HighestAttempt": 2, "Floor": 3, "SeqScope": ["key", "new key"]}}
    assert [r["Entry"] for r in records[1:]] == V1_ENTRIES and {r["Op"] for r in records[1:]} == {"Put"}
    journal.record_result("job-1", result_message("job-1", "FAILED"), attempt=2)
    reloaded = Journal.open(tmp_path, seq_scope="key")
    assert [e.to_json() for e in reloaded.entries()][:1] == V1_ENTRIES[:1]
    assert reloaded.get("job-1", 2).result[Key.STATUS] == "FAILED" and reloaded.highest_run == (5, 2)


def test_an_upgrade_that_cannot_write_keeps_the_version_1_journal_and_tries_again(tmp_path, monkeypatch, caplog):
    (tmp_path / OLD_JOURNAL_FILE).write_text(json.dumps(V1_JOURNAL))
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with caplog.at_level(logging.WARNING, logger=journal_module.__name__):
        journal = Journal.open(tmp_path, seq_scope="key")
    assert "No space left on device" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [OLD_JOURNAL_FILE]
    assert len(journal) == 3
    with pytest.raises(JournalError):
        journal.record_started("job-6", 6, START)
    monkeypatch.undo()
    journal.record_started("job-6", 6, START)
    assert sorted(p.name for p in tmp_path.iterdir()) == [JOURNAL_FILE]
    assert [e["JobId"] for e in read_entries(tmp_path)] == ["job-1", "job-1", "job-0", "job-6"]


@pytest.mark.parametrize("step", ["before-rename", "after-rename"])
def test_an_upgrade_killed_before_or_after_its_rename_is_done_again_or_finished(tmp_path, step):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / OLD_JOURNAL_FILE).write_text(json.dumps(V1_JOURNAL))
    script = f"""
import os, signal, sys
real = os.replace
def replace(src, dst):
    if {step == "after-rename"}:
        real(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from agent.journal import Journal
Journal.open(sys.argv[1], seq_scope="key")
"""
    done = subprocess.run([sys.executable, "-c", script, str(state)], env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    left = {"before-rename": [OLD_JOURNAL_FILE], "after-rename": [OLD_JOURNAL_FILE, JOURNAL_FILE]}[step]
    assert sorted(p.name for p in state.iterdir() if not p.name.endswith(".tmp")) == left

    journal = Journal.open(state, seq_scope="key")
    assert [e.to_json() for e in journal.entries()] == V1_ENTRIES and journal.highest_run == (5, 2)
    assert sorted(p.name for p in state.iterdir()) == [JOURNAL_FILE]


def test_read_entries_reads_either_format_without_changing_anything(tmp_path):
    assert read_entries(tmp_path) == []
    (tmp_path / OLD_JOURNAL_FILE).write_text(json.dumps(V1_JOURNAL))
    assert read_entries(tmp_path) == V1_ENTRIES
    assert sorted(p.name for p in tmp_path.iterdir()) == [OLD_JOURNAL_FILE]
    data, path = three_jobs(tmp_path / "v2")
    path.write_bytes(data + b"12 torn")
    assert [e["JobId"] for e in read_entries(tmp_path / "v2")] == ["job-1", "job-2", "job-3"]
    assert path.read_bytes() == data + b"12 torn"


def test_a_damaged_journal_that_cannot_be_copied_aside_still_loads(tmp_path, caplog, monkeypatch):
    data, path = three_jobs(tmp_path)
    path.write_bytes(flip(data, 3, b'"'))
    monkeypatch.setattr(os, "link", lambda src, dst: (_ for _ in ()).throw(OSError(1, "Operation not permitted")))
    with caplog.at_level(logging.ERROR, logger=journal_module.__name__):
        journal = Journal.open(tmp_path, seq_scope="key")
    assert summary(journal) == ([*DONE, ("job-3", 3, False, GROUP)], (3, 1), 2)
    assert "could not keep a copy" in caplog.text
