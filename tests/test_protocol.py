"""The wire contract: topics, the transition table, times and decoding. No broker needed."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from agent import protocol
from agent.protocol import FINAL_STATUSES, JobStatus, MessageError, Topics, can_transition


def test_topics_are_per_device_under_the_prefix() -> None:
    topics = Topics("ota/v1/")
    assert topics.job("dev1") == "ota/v1/devices/dev1/job"
    assert topics.queue("dev1") == "ota/v1/devices/dev1/queue"
    assert topics.status("dev1") == "ota/v1/devices/dev1/status"
    assert topics.presence("dev1") == "ota/v1/devices/dev1/presence"
    assert topics.all_devices(Topics.STATUS) == "ota/v1/devices/+/status"


def test_parse_is_the_inverse_of_device_topics() -> None:
    topics = Topics()
    assert topics.parse(topics.status("dev-1.a")) == ("dev-1.a", "status")
    assert topics.parse("ota/v1/devices/a/b/status") is None
    assert topics.parse("other/devices/dev1/status") is None
    assert topics.parse("ota/v1/devices/+/status") is None


@pytest.mark.parametrize("prefix", ["", "/", "a/+/b", "a/#"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError):
        Topics(prefix)


def test_final_states_have_no_way_out() -> None:
    for final in FINAL_STATUSES:
        assert not any(can_transition(final, other) for other in JobStatus)


def test_pending_states_only_move_forward() -> None:
    assert can_transition(JobStatus.QUEUED, JobStatus.IN_PROGRESS)
    assert can_transition(JobStatus.QUEUED, JobStatus.SUCCEEDED)  # the IN_PROGRESS report was lost
    assert can_transition(JobStatus.IN_PROGRESS, JobStatus.FAILED)
    assert not can_transition(JobStatus.IN_PROGRESS, JobStatus.QUEUED)
    assert not can_transition(JobStatus.IN_PROGRESS, JobStatus.IN_PROGRESS)


def test_every_status_is_in_the_table() -> None:
    assert set(protocol.TRANSITIONS) == set(JobStatus)


def test_times_are_utc_iso_with_z() -> None:
    moment = datetime(2026, 2, 8, 15, 4, 13, 250000, tzinfo=timezone.utc)
    text = protocol.format_time(moment)
    assert text == "2026-02-08T15:04:13.250Z"
    assert protocol.parse_time(text) == moment
    assert protocol.parse_time("2026-02-08T16:04:13.250+01:00") == moment
    assert protocol.parse_time("yesterday") is None
    assert protocol.format_time(None) is None


def test_decode_refuses_oversized_non_object_and_non_json() -> None:
    assert protocol.decode(protocol.encode({"A": "é"}), 100) == {"A": "é"}
    with pytest.raises(MessageError, match="over the limit"):
        protocol.decode(b"{}" + b" " * 100, 10)
    with pytest.raises(MessageError, match="not a JSON object"):
        protocol.decode(b"[1]", 100)
    with pytest.raises(MessageError, match="not UTF-8 JSON"):
        protocol.decode(b"\xff{", 100)


@pytest.mark.parametrize("value, ok", [("dev1", True), ("a.b_c-d:e", True), ("a/b", False), ("+", False),
                                       ("#", False), ("..", False), ("", False), ("-x", False), ("x" * 129, False)])
def test_device_id_rule(value: str, ok: bool) -> None:
    assert protocol.is_valid_device_id(value) is ok


def test_decode_refuses_deep_nesting_with_a_message_error() -> None:
    with pytest.raises(MessageError, match="nested too deeply"):
        protocol.decode(b"[" * 100_000, 1_000_000)


@pytest.mark.parametrize("payload", [b'{"A": "\\ud800"}', b'{"A": "\\uDFFF"}', b'{"\\udc00": 1}',
                                     b'{"A": ["x", {"B": "\\\\\\ud800"}]}', b'{"A": "\\ud83d"}'])
def test_decode_refuses_an_escaped_lone_surrogate_anywhere(payload: bytes) -> None:
    with pytest.raises(MessageError, match="not valid Unicode"):
        protocol.decode(payload, 100)


def test_decode_refuses_an_unescaped_surrogate_as_bad_utf8() -> None:
    with pytest.raises(MessageError, match="not UTF-8 JSON"):
        protocol.decode(b'{"A": "\xed\xa0\x80"}', 100)


def test_decode_keeps_escaped_pairs_backslashes_and_plain_text() -> None:
    assert protocol.decode(b'{"A": "\\ud83d\\ude00", "B": "\\\\ud800", "C": "\\u00e9"}', 100) == {
        "A": "\U0001f600", "B": "\\ud800", "C": "\u00e9"}
