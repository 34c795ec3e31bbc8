"""Artifacts end to end: the real service (embedded broker) and real agent processes.

One fleet (a service and three agents in one group) serves the module. Its devices reach the API
through an HttpTap (tests/support/http_tap.py; the service's --public-url), which shows what the
service was asked (each request's Range) and can hold a response halfway, so that an agent can
be killed mid-download on purpose rather than by luck.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.protocol import JobStatus, Key
from tests import test_agent_daemon as daemon_tests
from tests.conftest import Launcher
from tests.support.artifact_server import make_file
from tests.support.http_tap import HttpTap
from tests.support.processes import Service, wait_until
from tests.test_agent_daemon import DEVICE, job, runs

MiB = 1024 * 1024
GROUP = "e2e-fleet"
DEVICES = ("e2e-0", "e2e-1", "e2e-2")
HELD = DEVICES[0]  # the device whose first download is held halfway, and whose agent is killed
HOLD_AFTER = 8 * MiB

# For the 403 check: a real agent given a head signed by the test (test_agent_daemon's Mosquitto fixtures).
broker, pretend_service, start_agent = daemon_tests.broker, daemon_tests.service, daemon_tests.start_agent
ran, groups_file = daemon_tests.ran, daemon_tests.groups_file


class Fleet:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.launch = Launcher(workdir)
        self.tap = HttpTap("127.0.0.1", 9)  # pointed at the service once it has its port
        self.service: Service = self.launch.service(extra=("--public-url", self.tap.url))
        self.tap.target = ("127.0.0.1", self.service.http_port)
        self.agents = {}
        for device_id in DEVICES:
            password = self.service.api.device(device_id, group=GROUP)
            self.agents[device_id] = self.launch.agent(self.service, device_id, password)

    def upload(self, path: Path, name: str) -> dict[str, Any]:
        """POST /v1/artifact with the file's bytes streamed from disk, as curl --data-binary @file does."""
        api = self.service.api
        with path.open("rb") as body:
            request = urllib.request.Request(
                f"{api.base}/v1/artifact?Name={name}&Version=1", data=body, method="POST",
                headers={"Authorization": f"Bearer {api.token}", "Content-Type": "application/octet-stream",
                         "Content-Length": str(path.stat().st_size)})
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())

    def deploy(self, artifact: dict[str, Any], command: str) -> str:
        workflow = self.service.api.workflow(command, name=artifact["Name"], Artifacts=[artifact["ArtifactId"]])
        return self.service.api.submit(workflow, DeviceGroup=GROUP)

    def children(self, job_id: str) -> dict[str, dict[str, Any]]:
        return {c["DeviceId"]: c for c in self.service.api.ok("GET", f"/v1/job/{job_id}/childjobs")}

    def part_file(self, device_id: str, sha256: str) -> Path:
        return self.agents[device_id].state_dir / device_id / "artifacts" / f"{sha256}.part"

    def close(self) -> None:
        self.launch.close()
        self.tap.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        yield fleet
    finally:
        fleet.close()


def checking_command(runs_dir: Path) -> str:
    """Counts its runs per device, and prints the SHA-256 of what it was given."""
    return f'echo run >> "{runs_dir}/$OTA_DEVICE_ID"; sha256sum "$OTA_ARTIFACT_1_PATH" | cut -c1-64'


def runs_of(runs_dir: Path, device_id: str) -> int:
    path = runs_dir / device_id
    return len(path.read_text().split()) if path.exists() else 0


@pytest.mark.timeout(180)
def test_a_50_mb_artifact_reaches_the_group_and_a_killed_download_resumes_from_its_offset(fleet, tmp_path):
    data = tmp_path / "app.bin"
    sha256 = make_file(data, 50 * MiB, b"e2e")
    artifact = fleet.upload(data, "app.bin")
    assert (artifact["Sha256"], artifact["Size"]) == (sha256, 50 * MiB)
    fleet.tap.hold(f"device={HELD}&", HOLD_AFTER)
    job_id = fleet.deploy(artifact, checking_command(tmp_path))

    part = fleet.part_file(HELD, sha256)
    wait_until(lambda: part.exists() and part.stat().st_size >= HOLD_AFTER - MiB, 60, "the held download's bytes")
    fleet.agents[HELD].stop(signal.SIGKILL)
    offset = part.stat().st_size
    fleet.tap.release()
    fleet.agents[HELD].start()

    fleet.service.api.wait_job(job_id, timeout=90)
    children = fleet.children(job_id)
    assert {d: (c["Status"], c["Stdout"]) for d, c in children.items()} == \
        {d: (JobStatus.SUCCEEDED.value, sha256 + "\n") for d in DEVICES}
    held = [r.range for r in fleet.tap.requests if f"device={HELD}&" in r.line]
    assert held == [None, f"bytes={offset}-"], fleet.tap.requests
    assert 0 < offset < 50 * MiB
    assert f"resuming at byte {offset} of {50 * MiB}" in fleet.agents[HELD].log()
    assert [runs_of(tmp_path, d) for d in DEVICES] == [1, 1, 1]


def test_a_corrupt_stored_file_is_refused_by_every_device_and_nothing_runs(fleet, tmp_path):
    data = tmp_path / "tool.bin"
    sha256 = make_file(data, MiB, b"corrupt")
    artifact = fleet.upload(data, "tool.bin")
    stored = fleet.service.data_dir / "artifacts" / sha256
    spoiled = bytearray(stored.read_bytes())
    spoiled[MiB // 2] ^= 0xFF
    stored.write_bytes(bytes(spoiled))

    job_id = fleet.deploy(artifact, checking_command(tmp_path))
    fleet.service.api.wait_job(job_id, timeout=60)
    for device_id, child in fleet.children(job_id).items():
        assert child["Status"] == JobStatus.FAILED.value, (device_id, child)
        assert f"checksum mismatch: expected SHA-256 {sha256}, got " in child["Reason"], child
        assert runs_of(tmp_path, device_id) == 0


@pytest.mark.mosquitto
def test_a_403_from_the_service_is_reported_failed_with_the_reason(launch, start_agent, pretend_service, ran,
                                                                   groups_file):
    """A link the service refuses (another device's, a wrong token) fails the job at once, saying why."""
    real = launch.service()
    artifact = {"Sha256": "a" * 64, "Size": 10, "Name": "x.bin",
                "Url": f"{real.base_url}/v1/device-artifact/{'a' * 64}?device={DEVICE}&job=j1&token=00"}
    daemon_tests.ready_agent(start_agent, pretend_service)
    pretend_service.publish_head("j1", job(ran, groups_file, "j1"), **{Key.ARTIFACTS: [artifact]})
    while (message := pretend_service.next_status())[Key.STATUS] == JobStatus.DOWNLOADING.value:
        pass
    assert message[Key.STATUS] == JobStatus.FAILED.value
    assert "the server refused the download: HTTP 403" in message[Key.REASON], message
    assert runs(ran) == []
