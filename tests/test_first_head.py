"""A new device's first head: signed and published when the device first comes online, not at
registration (registering 10,000 devices then costs hashing and inserting, not 20,000 publishes)."""

from __future__ import annotations

import queue

import pytest

from agent import job_signature
from agent.protocol import Key
from tests.conftest import Launcher
from tests.support.fake_device import FakeDevice
from tests.support.processes import Api, wait_until


def _child(api: Api, job_id: str) -> str:
    """The device's child job of a single-device job: the id its head names."""
    return api.ok("GET", f"/v1/job/{job_id}/childjobs")[0]["JobId"]


def test_a_new_device_gets_its_first_head_when_it_first_comes_online(launch: Launcher) -> None:
    service = launch.service()
    device = FakeDevice(service.broker_url, "fresh", service.api.device("fresh"))
    try:
        with pytest.raises(queue.Empty):  # registered and connected, but silent: nothing signed for it yet
            device.next_head(timeout=2)
        device.say_online()
        head = device.next_head()
        assert head is not None and head[Key.DEVICE_ID] == "fresh" and Key.JOB_ID not in head  # the idle head
        assert job_signature.signed_content(head) is not None and Key.SIGNATURE in head
        job = _child(service.api, service.api.submit(service.api.workflow("true"), DeviceId="fresh"))
        assert device.head_for(job)[Key.DEVICE_ID] == "fresh"  # a job's head comes as before, presence or not
    finally:
        device.close()


def test_a_device_with_a_job_before_it_ever_came_online_gets_that_head(launch: Launcher) -> None:
    service = launch.service()
    password = service.api.device("early")
    job = _child(service.api, service.api.submit(service.api.workflow("true"), DeviceId="early"))
    device = FakeDevice(service.broker_url, "early", password)
    try:
        assert device.head_for(job)[Key.DEVICE_ID] == "early"  # retained since the submission
        device.say_online()  # its first presence has its head published again: the same job's, never an idle one
        wait_until(lambda: service.api.ok("GET", "/v1/device/early").get("LastSeen"), 15, "the presence stored")
    finally:
        device.close()
    again = FakeDevice(service.broker_url, "early", password)
    try:
        assert again.head_for(job)[Key.DEVICE_ID] == "early"  # what the broker retains is still the job's head
    finally:
        again.close()
