"""The agent's journal: durable, atomic, bounded, and safe with a broken file."""

import json
import logging
import os
import stat
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent import journal as journal_module
from agent.journal import FULL_OUTPUT_ENTRIES, JOURNAL_FILE, Journal, JournalError, UnsafeDirectory
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


def test_every_write_goes_through_a_synced_temp_file_in_the_same_dir(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                  real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (calls.append(("replace", str(src), str(dst))),
                                                         real_replace(src, dst)))
    Journal.open(tmp_path).record_started("job-1", 1, START)

    fsync_file, replace, fsync_dir = calls
    assert fsync_file[0] == "fsync" and os.path.dirname(fsync_file[1]) == str(tmp_path)
    assert fsync_file[1].endswith(".tmp")
    assert replace == ("replace", fsync_file[1], str(tmp_path / JOURNAL_FILE))
    assert fsync_dir == ("fsync", str(tmp_path))


def test_a_failed_write_keeps_the_old_journal_and_leaves_no_temp_file(tmp_path, monkeypatch):
    journal = Journal.open(tmp_path)
    journal.record_started("job-1", 1, START)
    before = (tmp_path / JOURNAL_FILE).read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(JournalError, match="No space left on device"):
        journal.record_result("job-1", result_message("job-1"))
    assert (tmp_path / JOURNAL_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [JOURNAL_FILE]


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


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[]", b'{"Version": 1, "Entries": [{"Seq": 1}]}',
                                     b'{"Version": 99, "Entries": []}',
                                     b'{"Version": 1, "Entries": [], "HighestSeq": "7"}'])
def test_a_corrupt_journal_is_moved_aside_and_the_agent_starts_empty(tmp_path, caplog, content):
    (tmp_path / JOURNAL_FILE).write_bytes(content)
    with caplog.at_level(logging.ERROR, logger=journal_module.__name__):
        journal = Journal.open(tmp_path)

    assert len(journal) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f"{JOURNAL_FILE}.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert not (tmp_path / JOURNAL_FILE).exists()
    assert "unreadable" in caplog.text and aside[0].name in caplog.text
    journal.record_started("job-1", 1, START)
    assert Journal.open(tmp_path).get("job-1") is not None


def test_a_symlinked_journal_is_not_followed_out_of_the_state_dir(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"Version": 1, "Entries": []}))
    state = tmp_path / "state"
    state.mkdir()
    (state / JOURNAL_FILE).symlink_to(outside)

    journal = Journal.open(state)
    journal.record_started("job-1", 1, START)

    assert json.loads(outside.read_text()) == {"Version": 1, "Entries": []}
    assert not (state / JOURNAL_FILE).is_symlink()
    assert any(p.name.startswith(f"{JOURNAL_FILE}.corrupt-") for p in state.iterdir())


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


def test_a_bad_process_group_makes_the_journal_unreadable(tmp_path, caplog):
    entry = {"JobId": "job-1", "Seq": 1, "StartTime": "2024-05-01T12:00:00.000Z", "Result": None,
             "Process": {"Pgid": "4242", "BootId": "x", "StartTicks": 1}}
    (tmp_path / JOURNAL_FILE).write_text(json.dumps({"Version": 1, "Entries": [entry]}))
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
