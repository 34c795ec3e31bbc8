"""Bulk registration (POST /v1/devices): all or none, every password once, and concurrent
registrations (bulk and single) that all succeed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from ota_bridge.api.schemas import MAX_BULK_DEVICES
from tests.support.fake_device import FakeDevice
from tests.support.processes import Api, Service


def test_a_bulk_registration_answers_each_device_and_its_password_once(service: Service) -> None:
    api = service.api
    body = {"Devices": [{"DeviceId": "bulk-a", "DeviceGroup": "g1", "Tags": ["t1", "t1", "t2"]},
                        {"DeviceId": "bulk-b"}]}
    answer = api.request("POST", "/v1/devices", body)
    assert answer.status == 201, answer.body
    devices = answer.body["Devices"]
    assert [d["DeviceId"] for d in devices] == ["bulk-a", "bulk-b"]
    assert [d["MqttUsername"] for d in devices] == ["bulk-a", "bulk-b"]
    assert len({d["MqttPassword"] for d in devices}) == 2
    assert devices[0]["Tags"] == ["t1", "t2"] and devices[0]["DeviceGroup"] == "g1"
    stored = api.ok("GET", "/v1/device/bulk-a")
    assert {k: v for k, v in devices[0].items() if not k.startswith("Mqtt")} == stored
    assert [d["DeviceId"] for d in api.ok("GET", "/v1/device?TagId=t2")] == ["bulk-a"]


def test_the_passwords_log_in_and_the_devices_get_jobs(service: Service) -> None:
    api = service.api
    devices = api.ok("POST", "/v1/devices", {"Devices": [{"DeviceId": f"work-{n}"} for n in range(3)]})["Devices"]
    fakes = [FakeDevice(service.broker_url, d["DeviceId"], d["MqttPassword"]) for d in devices]
    try:
        job = api.submit(api.workflow("true"), DeviceId="work-2")
        child = api.ok("GET", f"/v1/job/{job}/childjobs")[0]["JobId"]
        fakes[2].head_for(child)
        fakes[2].report(child, "SUCCEEDED", ExitCode=0)
        assert api.wait_job(job)["Status"] == "SUCCEEDED"
    finally:
        for fake in fakes:
            fake.close()


def test_ids_already_registered_are_all_named_and_nothing_is_written(service: Service) -> None:
    api = service.api
    api.device("taken-1")
    api.device("taken-2")
    body = {"Devices": [{"DeviceId": "fresh-x"}, {"DeviceId": "taken-1"}, {"DeviceId": "taken-2"}]}
    answer = api.request("POST", "/v1/devices", body)
    assert answer.status == 409, answer.body
    assert "'taken-1'" in answer.body["Detail"] and "'taken-2'" in answer.body["Detail"], answer.body
    assert api.request("GET", "/v1/device/fresh-x").status == 404


def test_invalid_and_repeated_ids_are_all_named_and_nothing_is_written(service: Service) -> None:
    api = service.api
    body = {"Devices": [{"DeviceId": "ok-1"}, {"DeviceId": "bad/one"}, {"DeviceId": "bad:two"}]}
    answer = api.request("POST", "/v1/devices", body)
    assert answer.status == 400, answer.body
    assert "Devices.1.DeviceId" in answer.body["Detail"] and "Devices.2.DeviceId" in answer.body["Detail"]
    repeated = api.request("POST", "/v1/devices", {"Devices": [{"DeviceId": "ok-1"}, {"DeviceId": "twice"},
                                                               {"DeviceId": "twice"}]})
    assert repeated.status == 400 and "'twice'" in repeated.body["Detail"], repeated.body
    assert api.request("GET", "/v1/device/ok-1").status == 404


@pytest.mark.parametrize("count", [0, MAX_BULK_DEVICES + 1])
def test_an_empty_or_oversized_request_is_refused(service: Service, count: int) -> None:
    answer = service.api.request("POST", "/v1/devices", {"Devices": [{"DeviceId": f"n-{n}"} for n in range(count)]})
    assert answer.status == 400 and "Devices" in answer.body["Detail"], answer.body


def test_concurrent_bulk_and_single_registrations_all_succeed(service: Service) -> None:
    api: Api = service.api

    def register(n: int) -> tuple[int, list[str]]:
        if n % 2:
            answer = api.request("POST", "/v1/device", {"DeviceId": f"conc-{n}"})
            return answer.status, [answer.body.get("DeviceId", answer.body.get("Detail"))]
        batch = [{"DeviceId": f"conc-{n}-{k}"} for k in range(50)]
        answer = api.request("POST", "/v1/devices", {"Devices": batch})
        return answer.status, [d["DeviceId"] for d in answer.body.get("Devices", [])] or [answer.body["Detail"]]

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(register, range(20)))
    assert [status for status, _ in results] == [201] * 20, results
    listed = {d["DeviceId"] for d in api.ok("GET", "/v1/device")}
    assert {i for _, ids in results for i in ids} <= listed
