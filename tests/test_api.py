"""The REST API against a real service process: shapes, errors, pagination, auth.

No agent runs here, so jobs stay QUEUED; test_reference_flow.py runs them for real.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import Api, Service

UUID_LEN = 36


@pytest.fixture
def api(service: Service) -> Api:
    return service.api


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_first_start_writes_admin_token_with_mode_0600_and_prints_only_where(service: Service) -> None:
    path = service.data_dir / "admin-token"
    assert path.stat().st_mode & 0o777 == 0o600
    assert f"Created the admin API token in {path}" in service.log()
    assert path.read_text().strip() not in service.log()  # stdout is the journal under systemd


def test_workflow_create_get_list_delete(api: Api) -> None:
    wf = api.workflow("date", name="print-date-workflow")
    assert len(wf) == UUID_LEN
    got = api.ok("GET", f"/v1/workflow/{wf}")
    assert got["WorkflowId"] == wf and got["Name"] == "print-date-workflow" and got["Command"] == "date"
    assert got["CreatedTime"].endswith("Z") and "T" in got["CreatedTime"]
    assert wf in [w["WorkflowId"] for w in api.ok("GET", "/v1/workflow")]
    assert api.request("DELETE", f"/v1/workflow/{wf}").status == 200
    assert api.request("GET", f"/v1/workflow/{wf}").status == 404
    assert api.request("DELETE", f"/v1/workflow/{wf}").status == 404


def test_typographic_quotes_get_a_message_that_says_so(api: Api) -> None:
    resp = api.request("POST", "/v1/workflow", raw='{“Name”: "print-date-workflow”, “Command": "date"}'.encode())
    assert resp.status == 400
    assert "typographic quote" in resp.body["Detail"] and "U+201C" in resp.body["Detail"]
    assert "column 2" in resp.body["Detail"]


def test_malformed_json_names_position_and_character(api: Api) -> None:
    resp = api.request("POST", "/v1/workflow", raw=b'{"Name": "x", "Command": date}')
    assert resp.status == 400
    assert resp.body["Error"] == "Malformed JSON"
    assert "column 26" in resp.body["Detail"] and "'d'" in resp.body["Detail"]


@pytest.mark.parametrize("body, expected", [
    ({"Command": "date"}, "missing field 'Name'"),
    ({"Name": "x", "Command": "date", "Colour": 1}, "unknown field 'Colour'"),
    ({"Name": "x", "Command": "   "}, "Command"),
    ({"Name": "x", "Command": "date", "TimeoutSeconds": "10"}, "TimeoutSeconds"),
    ([1, 2], "JSON object"),
    ({"Name": "x", "Command": "echo a\x00b"}, "Command"),
    ({"Name": "x", "Command": "x" * (16 * 1024 + 1)}, "Command"),
    ({"Name": "bell\x07", "Command": "date"}, "Name"),
])
def test_bad_workflow_bodies_are_400_naming_the_field(api: Api, body: object, expected: str) -> None:
    before = len(api.ok("GET", "/v1/workflow"))
    resp = api.request("POST", "/v1/workflow", body)
    assert resp.status == 400 and expected in resp.body["Detail"]
    assert len(api.ok("GET", "/v1/workflow")) == before


def test_missing_or_wrong_token_is_401(api: Api) -> None:
    assert api.request("GET", "/v1/workflow", token=None).status == 401
    resp = api.request("GET", "/v1/workflow", token="not-a-token")
    assert resp.status == 401 and resp.body["Error"] == "Unauthorized"


def test_unknown_route_is_json_404(api: Api) -> None:
    resp = api.request("GET", "/v1/nothing-here")
    assert resp.status == 404 and "Error" in resp.body


def test_device_register_returns_credentials_once(api: Api) -> None:
    dev = unique("dev")
    created = api.ok("POST", "/v1/device", {"DeviceId": dev, "DeviceGroup": "g1", "Tags": ["a", "b"]})
    assert created["MqttUsername"] == dev and len(created["MqttPassword"]) >= 32
    got = api.ok("GET", f"/v1/device/{dev}")
    assert "MqttPassword" not in got
    assert got["DeviceGroup"] == "g1" and got["Tags"] == ["a", "b"] and got["Online"] is False
    assert api.request("POST", "/v1/device", {"DeviceId": dev}).status == 409


def test_multi_line_commands_are_fine(api: Api) -> None:
    wf = api.workflow("set -e\ncd /tmp\n\techo ok\r\n")
    assert api.ok("GET", f"/v1/workflow/{wf}")["Command"] == "set -e\ncd /tmp\n\techo ok\r\n"


def test_device_patch_changes_group_and_tags_and_delete(api: Api) -> None:
    dev = unique("dev")
    api.device(dev, group="old", tags=["x"])
    patched = api.ok("PATCH", f"/v1/device/{dev}", {"DeviceGroup": "new"})
    assert patched["DeviceGroup"] == "new" and patched["Tags"] == ["x"]
    patched = api.ok("PATCH", f"/v1/device/{dev}", {"Tags": ["y", "z"]})
    assert patched["DeviceGroup"] == "new" and patched["Tags"] == ["y", "z"]
    assert api.ok("PATCH", f"/v1/device/{dev}", {"DeviceGroup": None})["DeviceGroup"] is None
    assert api.request("DELETE", f"/v1/device/{dev}").status == 200
    assert api.request("GET", f"/v1/device/{dev}").status == 404


@pytest.mark.parametrize("device_id", ["a/b", "a+b", "#", "", "x" * 200, "..", "sp ace", "api", "ota-bridge-service"])
def test_device_ids_that_cannot_be_topics_are_refused(api: Api, device_id: str) -> None:
    resp = api.request("POST", "/v1/device", {"DeviceId": device_id})
    assert resp.status == 400 and "DeviceId" in resp.body["Detail"]


def test_job_needs_exactly_one_target(api: Api) -> None:
    wf = api.workflow("true")
    none = api.request("POST", "/v1/job", {"Name": "j", "WorkflowId": wf})
    assert none.status == 400 and "exactly one target" in none.body["Detail"]
    two = api.request("POST", "/v1/job", {"Name": "j", "WorkflowId": wf, "DeviceId": "a", "TagId": "b"})
    assert two.status == 400 and "DeviceId, TagId" in two.body["Detail"]


def test_job_unknown_workflow_device_or_empty_group(api: Api) -> None:
    wf = api.workflow("true")
    dev = unique("dev")
    api.device(dev, group=unique("grp"))
    assert api.request("POST", "/v1/job", {"Name": "j", "WorkflowId": "nope", "DeviceId": dev}).status == 404
    assert api.request("POST", "/v1/job", {"Name": "j", "WorkflowId": wf, "DeviceId": "ghost"}).status == 404
    empty = api.request("POST", "/v1/job", {"Name": "j", "WorkflowId": wf, "DeviceGroup": "nobody-here"})
    assert empty.status == 400 and "DeviceGroup 'nobody-here'" in empty.body["Detail"]
    tag = api.request("POST", "/v1/job", {"Name": "j", "WorkflowId": wf, "TagId": "no-tag"})
    assert tag.status == 400 and "TagId 'no-tag'" in tag.body["Detail"]


def test_group_job_makes_one_child_per_device(api: Api) -> None:
    group = unique("grp")
    devices = sorted(unique("dev") for _ in range(3))
    for dev in devices:
        api.device(dev, group=group)
    wf = api.workflow("echo hi")
    job = api.submit(wf, DeviceGroup=group)
    summary = api.ok("GET", f"/v1/job/{job}")
    assert summary["DeviceGroup"] == group and summary["Status"] == "QUEUED"
    assert summary["Result"]["QUEUED"] == 3 and summary["Result"]["Total"] == 3
    children = api.ok("GET", f"/v1/job/{job}/childjobs")
    assert [c["DeviceId"] for c in children] == devices
    assert all(c["ParentJobId"] == job and c["Status"] == "QUEUED" and c["Command"] == "echo hi" for c in children)
    child = api.ok("GET", f"/v1/job/{children[0]['JobId']}")
    assert child["DeviceId"] == devices[0] and child["ParentJobId"] == job


def test_tag_job_targets_tagged_devices_only(api: Api) -> None:
    tag = unique("tag")
    tagged = unique("dev")
    api.device(tagged, tags=[tag])
    api.device(unique("dev"), tags=["other"])
    job = api.submit(api.workflow("true"), TagId=tag)
    assert [c["DeviceId"] for c in api.ok("GET", f"/v1/job/{job}/childjobs")] == [tagged]


def test_deleting_a_workflow_keeps_its_jobs_records(api: Api) -> None:
    dev = unique("dev")
    api.device(dev)
    wf = api.workflow("echo kept")
    job = api.submit(wf, DeviceId=dev)
    api.ok("DELETE", f"/v1/workflow/{wf}")
    summary = api.ok("GET", f"/v1/job/{job}")
    assert summary["Command"] == "echo kept" and summary["WorkflowId"] == wf


def test_job_list_is_newest_first_and_paginated(api: Api) -> None:
    dev = unique("dev")
    api.device(dev)
    wf = api.workflow("true")
    jobs = [api.submit(wf, name=f"page-{i}", DeviceId=dev) for i in range(3)]
    first = api.request("GET", "/v1/job?Limit=2")
    assert [j["JobId"] for j in first.body] == jobs[::-1][:2]
    assert int(first.headers["X-Total-Count"]) >= 3
    second = api.ok("GET", "/v1/job?Limit=2&Offset=2")
    assert second[0]["JobId"] == jobs[0]
    assert api.request("GET", "/v1/job?Limit=0").status == 400
    assert api.request("GET", "/v1/job?Limit=abc").status == 400


def test_delete_job_takes_children_out_of_queues(api: Api) -> None:
    dev = unique("dev")
    api.device(dev)
    wf = api.workflow("true")
    job = api.submit(wf, DeviceId=dev)
    assert api.ok("GET", f"/v1/device/{dev}")["PendingJobs"] == 1
    assert api.request("DELETE", f"/v1/job/{job}").status == 200
    assert api.request("GET", f"/v1/job/{job}").status == 404
    assert api.request("GET", f"/v1/job/{job}/childjobs").status == 404
    assert api.ok("GET", f"/v1/device/{dev}")["PendingJobs"] == 0


def test_a_get_with_wait_seconds_answers_once_the_job_is_final(api: Api) -> None:
    dev = unique("dev")
    api.device(dev)
    job = api.submit(api.workflow("true"), DeviceId=dev)
    child = api.ok("GET", f"/v1/job/{job}/childjobs")[0]["JobId"]
    answers: dict[str, Any] = {}
    waiters = [threading.Thread(target=lambda i=i: answers.update({i: api.ok("GET", f"/v1/job/{i}?WaitSeconds=60")}))
               for i in (job, child)]
    for waiter in waiters:
        waiter.start()
    waiters[0].join(1.0)
    assert all(waiter.is_alive() for waiter in waiters)  # held: the job is QUEUED (no agent runs here)
    api.ok("POST", f"/v1/job/{job}/cancel")
    for waiter in waiters:
        waiter.join(30)
    assert answers[job]["Status"] == answers[child]["Status"] == "CANCELED"
    assert answers[job] == api.ok("GET", f"/v1/job/{job}")
    assert answers[child] == api.ok("GET", f"/v1/job/{child}")


def test_a_get_with_wait_seconds_answers_the_job_unfinished_when_the_time_is_up(api: Api) -> None:
    dev = unique("dev")
    api.device(dev)
    job = api.submit(api.workflow("true"), DeviceId=dev)
    assert api.ok("GET", f"/v1/job/{job}?WaitSeconds=1") == api.ok("GET", f"/v1/job/{job}")
    assert api.ok("GET", f"/v1/job/{job}?waitseconds=0")["Status"] == "QUEUED"
    api.ok("POST", f"/v1/job/{job}/cancel")
    assert api.ok("GET", f"/v1/job/{job}?WaitSeconds=60")["Status"] == "CANCELED"  # final: answered at once


def test_a_held_get_is_answered_as_the_job_is_when_the_service_stops(tmp_path: Path) -> None:
    service = Service(tmp_path)
    service.start()
    try:
        api = service.api
        dev = unique("dev")
        api.device(dev)
        job = api.submit(api.workflow("true"), DeviceId=dev)
        answers: dict[str, Any] = {}
        held = f"/v1/job/{job}?WaitSeconds=60"
        waiter = threading.Thread(target=lambda: answers.update(held=api.request("GET", held)))
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive()
        assert service.stop(timeout=30) == 0  # a clean exit, not killed after waiting for the held GET
        waiter.join(10)
        assert answers["held"].status == 200 and answers["held"].body["Status"] == "QUEUED"
    finally:
        service.stop()


def test_cancel_keeps_the_record(api: Api) -> None:
    dev = unique("dev")
    api.device(dev)
    job = api.submit(api.workflow("true"), DeviceId=dev)
    canceled = api.ok("POST", f"/v1/job/{job}/cancel")
    assert canceled["Status"] == "CANCELED"
    assert api.ok("GET", f"/v1/job/{job}/childjobs")[0]["Status"] == "CANCELED"
    assert api.ok("GET", f"/v1/device/{dev}")["PendingJobs"] == 0
