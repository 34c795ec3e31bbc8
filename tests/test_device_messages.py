"""Validation of what devices send, and the shape of what the service publishes."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime

import pytest

from agent.protocol import OUTPUT_CAP_BYTES, JobStatus, MessageError, encode
from ota_bridge.artifact_links import ArtifactLinks
from ota_bridge.device_messages import head_message, parse_presence, parse_update, queue_message
from ota_bridge.store.artifacts import ArtifactRef
from ota_bridge.store.queues import DeviceQueue, QueueEntry

ENTRY = QueueEntry("c1", "p1", "job", "date", 60, False, 7, "QUEUED", datetime(2026, 1, 1))


ISSUED = datetime(2026, 1, 2, 3, 4, 5, 678000)


def test_head_message_carries_what_the_agent_needs() -> None:
    head = json.loads(head_message("dev1", ENTRY, 6, ISSUED))
    assert head == {"JobId": "c1", "ParentJobId": "p1", "JobName": "job", "DeviceId": "dev1", "Command": "date",
                    "TimeoutSeconds": 60, "SuccessOnRestart": False, "Seq": 7, "Floor": 6,
                    "IssuedAt": "2026-01-02T03:04:05.678Z", "SubmittedTime": "2026-01-01T00:00:00.000Z"}


def test_with_nothing_pending_the_head_is_an_idle_head_not_an_empty_payload() -> None:
    idle = json.loads(head_message("dev1", None, 41, ISSUED, sign=lambda data: data.decode()))
    assert idle == {"DeviceId": "dev1", "Floor": 41, "IssuedAt": "2026-01-02T03:04:05.678Z",
                    "Signature": "ota-bridge idle v2\ndev1\n41\n2026-01-02T03:04:05.678Z"}


def test_queue_message_lists_pending_jobs_in_order() -> None:
    second = QueueEntry("c2", "p2", "job2", "ls", 60, False, 9, "QUEUED", datetime(2026, 1, 1))
    queue = json.loads(queue_message(DeviceQueue("dev1", (ENTRY, second), 2)))
    assert [j["JobId"] for j in queue["Jobs"]] == ["c1", "c2"] and queue["Total"] == 2
    assert queue_message(DeviceQueue("dev1", (), 0)) == b""


def test_queue_message_from_kept_entries_is_what_encoding_it_whole_gives() -> None:
    held = QueueEntry("c3", "p3", "jöb3", "x" * 300, 60, False, 10, "SCHEDULED", datetime(2026, 1, 1), "a window")
    running = replace(ENTRY, status="IN_PROGRESS")
    for entries in [(ENTRY, held), (ENTRY, held), (running, held)]:  # the second and third reuse kept entries
        message = queue_message(DeviceQueue("dev1", entries, 7))
        whole = json.loads(message)
        assert message == encode(whole)
        assert [j["Status"] for j in whole["Jobs"]] == [entries[0].status, "SCHEDULED"]
        assert whole["Jobs"][1]["Reason"] == "a window" and whole["Jobs"][1]["CommandTruncated"] is True


def test_final_update_is_parsed_with_naive_utc_times() -> None:
    update = parse_update("dev1", encode({
        "JobId": "c1", "Status": "FAILED", "ExitCode": 3, "Stdout": "o", "Stderr": "e",
        "StartTime": "2026-01-01T01:00:00+01:00", "EndTime": "2026-01-01T00:00:01Z"}))
    assert update.status is JobStatus.FAILED and update.exit_code == 3
    assert update.start_time == datetime(2026, 1, 1) and update.start_time.tzinfo is None


@pytest.mark.parametrize("message, field", [
    ({"Status": "SUCCEEDED"}, "JobId"),
    ({"JobId": "c1", "Status": "DONE"}, "Status"),
    ({"JobId": "c1", "Status": "QUEUED"}, "Status"),
    ({"JobId": "c1", "Status": "FAILED", "ExitCode": "1"}, "ExitCode"),
    ({"JobId": "c1", "Status": "FAILED", "ExitCode": True}, "ExitCode"),
    ({"JobId": "c1", "Status": "FAILED", "Stdout": 5}, "Stdout"),
    ({"JobId": "c1", "Status": "FAILED", "EndTime": "noon"}, "EndTime"),
])
def test_bad_updates_name_the_field(message: dict, field: str) -> None:
    with pytest.raises(MessageError, match=field):
        parse_update("dev1", encode(message))


def test_oversized_output_is_capped_again_keeping_the_tail() -> None:
    big = "a" * OUTPUT_CAP_BYTES + "THE END"
    update = parse_update("dev1", encode({"JobId": "c1", "Status": "SUCCEEDED", "Stdout": big}))
    assert update.stdout.endswith("THE END") and len(update.stdout.encode()) <= OUTPUT_CAP_BYTES
    assert update.stdout_truncated and not update.stderr_truncated


def test_presence() -> None:
    assert parse_presence("d", b'{"Presence": "online"}').online is True
    assert parse_presence("d", b'{"Presence": "offline"}').online is False
    with pytest.raises(MessageError):
        parse_presence("d", b'{"Presence": "maybe"}')


def test_lone_surrogates_are_refused_at_the_boundary() -> None:
    with pytest.raises(MessageError, match="not valid Unicode"):
        parse_update("dev1", b'{"JobId": "c1", "Status": "FAILED", "Stdout": "\\ud800"}')


def test_nul_in_output_is_replaced_so_every_database_can_store_it() -> None:
    update = parse_update("dev1", encode({"JobId": "c1", "Status": "FAILED", "Stdout": "a\x00b", "Reason": "\x00"}))
    assert update.stdout == "a\ufffdb" and update.reason == "\ufffd"


@pytest.mark.parametrize("job_id", ["", "a b", "x" * 65, "\ud7ff", "../etc"])
def test_job_ids_of_the_wrong_shape_are_refused(job_id: str) -> None:
    with pytest.raises(MessageError, match="JobId"):
        parse_update("dev1", json.dumps({"JobId": job_id, "Status": "FAILED"}).encode())


def test_queue_message_shows_a_preview_of_long_commands() -> None:
    long = QueueEntry("c1", "p1", "job", "x" * 5000, 60, False, 7, "QUEUED", datetime(2026, 1, 1))
    job = json.loads(queue_message(DeviceQueue("dev1", (long,), 1)))["Jobs"][0]
    assert len(job["Command"]) == 200 and job["CommandTruncated"] is True
    assert "CommandTruncated" not in json.loads(queue_message(DeviceQueue("dev1", (ENTRY,), 1)))["Jobs"][0]


def test_worst_case_output_fits_the_status_message_limit() -> None:
    worst = "\x01" * OUTPUT_CAP_BYTES  # each control byte becomes \u0001: six bytes
    payload = encode({"JobId": "c1", "Status": "SUCCEEDED", "Stdout": worst, "Stderr": worst})
    assert parse_update("dev1", payload).stdout == worst


# --- artifacts -------------------------------------------------------------------------------------

FW = ArtifactRef("fw.bin", "ab" * 32, 1234)


def test_a_head_with_artifacts_carries_each_with_its_link_and_signs_them_in_the_v3_form() -> None:
    links = ArtifactLinks(b"k" * 32, "https://ota.example.com")
    entry = replace(ENTRY, artifacts=(FW,))
    head = json.loads(head_message("dev1", entry, 6, ISSUED, sign=lambda data: data.decode(), artifact_url=links.url))
    [artifact] = head["Artifacts"]
    token = links.token("dev1", "c1", FW.sha256)
    assert artifact == {"Sha256": FW.sha256, "Size": 1234, "Name": "fw.bin",
                        "Url": f"https://ota.example.com/v1/device-artifact/{FW.sha256}?device=dev1&job=c1&token={token}"}
    assert head["Signature"].splitlines() == [
        "ota-bridge job v3", "dev1", "c1", "7", "6", "2026-01-02T03:04:05.678Z", "60", "0", "1", "1",
        f"{FW.sha256} 1234 fw.bin {artifact['Url']}", "date"]


def test_artifact_links_verify_only_their_own_device_job_and_file() -> None:
    links = ArtifactLinks(b"k" * 32, "http://h:1")
    token = links.token("dev1", "c1", FW.sha256)
    assert len(token) == 64 and links.verify("dev1", "c1", FW.sha256, token)
    assert not links.verify("dev2", "c1", FW.sha256, token) and not links.verify("dev1", "c2", FW.sha256, token)
    assert not links.verify("dev1", "c1", "cd" * 32, token) and not links.verify("dev1", "c1", FW.sha256, "x")
    assert not ArtifactLinks(b"j" * 32, "http://h:1").verify("dev1", "c1", FW.sha256, token)  # another key
    assert ArtifactLinks(b"k" * 32, "http://h:1", "https://cdn/a/").url("dev1", "c1", FW.sha256) == \
        f"https://cdn/a/{FW.sha256}"


def test_downloading_reports_carry_their_progress() -> None:
    update = parse_update("dev1", encode({"JobId": "c1", "Status": "DOWNLOADING",
                                          "Progress": {"Bytes": 10, "TotalBytes": 20}, "Attempt": 1}))
    assert update.status is JobStatus.DOWNLOADING and update.progress == (10, 20)
    assert parse_update("dev1", encode({"JobId": "c1", "Status": "DOWNLOADING"})).progress is None
    assert parse_update("dev1", encode({"JobId": "c1", "Status": "IN_PROGRESS", "Progress": "x"})).progress is None


@pytest.mark.parametrize("progress", [5, {"Bytes": -1, "TotalBytes": 2}, {"Bytes": 1}, {"Bytes": True, "TotalBytes": 2},
                                      {"Bytes": 1.5, "TotalBytes": 2}])
def test_a_downloading_report_with_a_bad_progress_is_refused_naming_it(progress: object) -> None:
    with pytest.raises(MessageError, match="Progress"):
        parse_update("dev1", encode({"JobId": "c1", "Status": "DOWNLOADING", "Progress": progress}))
