"""The SocketXP reference's own curl commands, run with real curl against a real service.

The commands are taken from the reference text as published (tests/data/socketxp-ota-api.txt);
only its typographic quotes become straight ones, and the host, token and example ids are
replaced. Real agents run the jobs, on the embedded amqtt broker and on Mosquitto.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Launcher
from tests.support.mosquitto import BROKERS, broker_url
from tests.support.processes import Service

REFERENCE = Path(__file__).parent / "data" / "socketxp-ota-api.txt"
EXAMPLE_WORKFLOW = "678edc16-96d1-4ea2-a99c-0474c2449381"
EXAMPLE_JOB = "4cad67dd-ab67-42ee-a293-4db493cab9ea"
CURLY = {"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"}
DEVICES = {"sensor-dev12345": "temp-sensor", "sensor-dev67890": "temp-sensor"}


def reference_curls() -> list[str]:
    """Every curl command of the reference, continuation lines joined."""
    commands, current = [], None
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        if line.startswith("curl "):
            current = []
        if current is not None:
            current.append(line.rstrip().rstrip("\\"))
            if not line.rstrip().endswith("\\"):
                commands.append(" ".join(current))
                current = None
    return commands


def straighten(command: str) -> str:
    return "".join(CURLY.get(c, c) for c in command)


def run_curl(command: str) -> tuple[int, object]:
    out = subprocess.run(["bash", "-c", command + " -s -S -w '\\n%{http_code}'"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    body, _, status = out.rpartition("\n")
    return int(status), json.loads(body) if body.strip() else None


def test_reference_has_the_commands_this_test_expects() -> None:
    commands = reference_curls()
    assert len(commands) == 15
    assert any("\u201c" in c for c in commands), "the reference's typographic quotes are part of the test"


@pytest.mark.parametrize("broker", BROKERS)
def test_reference_curl_flow_runs_jobs_on_real_agents(broker: str, launch: Launcher, tmp_path: Path) -> None:
    with broker_url(broker, tmp_path) as (mqtt_url, flags):
        service = launch.service(mqtt_url=mqtt_url, extra=flags)
        api = service.api
        for device, group in DEVICES.items():
            launch.agent(service, device, api.device(device, group=group, tags=[group]))
        results = ReferenceSession(service).run(reference_curls())

    by_device, group_children = results["device_job"], results["group_children"]
    assert by_device["DeviceId"] == "sensor-dev12345" and by_device["JobName"] == "test-job-123"
    assert by_device["Status"] == "SUCCEEDED" and by_device["Command"] == "date"
    assert re.search(r"\b20\d\d\b", by_device["Result"]), by_device  # the output of `date`
    assert by_device["StartTime"].endswith("Z") and by_device["EndTime"] >= by_device["StartTime"]
    assert sorted(c["DeviceId"] for c in group_children) == sorted(DEVICES)
    for child in group_children:
        assert child["Status"] == "SUCCEEDED" and child["ExitCode"] == 0 and child["Stderr"] == ""
        assert re.search(r"\b20\d\d\b", child["Stdout"])
    assert len(results["all_jobs"]) == 3
    assert results["after_delete"] == [404, 404, 200]  # the reference deletes two jobs


class ReferenceSession:
    """Runs the reference's commands in its order, keeping the ids the responses hand out."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.api = service.api
        self.workflow: str | None = None
        self.jobs: list[str] = []
        self.deleted = 0
        self.results: dict[str, object] = {}

    def run(self, commands: list[str]) -> dict[str, object]:
        create_workflow = commands[0]
        for command in commands:
            if "/v1/job" in command and "-X POST" in command and self.workflow is None:
                self.call(create_workflow)  # the reference deleted its workflow just before
            if "/v1/job" in command and "-X GET" in command and len(self.jobs) == 3:
                for job in self.jobs:
                    self.api.wait_job(job, timeout=60)
            self.call(command)
        self.results["after_delete"] = [self.api.request("GET", f"/v1/job/{j}").status for j in self.jobs]
        return self.results

    def call(self, command: str) -> None:
        status, body = run_curl(self.substitute(command))
        method = re.search(r"-X (\w+)", command).group(1)
        assert status == 200, f"{command}\n-> {status} {body}"
        self.record(method, command, body)

    def substitute(self, command: str) -> str:
        command = straighten(command).replace("https://api.socketxp.com", f"http://127.0.0.1:{self.service.http_port}")
        command = command.replace("<your-auth-token-goes-here>", self.api.token or "")
        if self.workflow:
            command = command.replace(":workflow_id", self.workflow).replace(EXAMPLE_WORKFLOW, self.workflow)
        if self.jobs:
            # The reference deletes "its" job twice (syntax, then sample): delete the next one each time.
            job = self.jobs[self.deleted] if "-X DELETE" in command else self.jobs[0]
            command = command.replace(":job_id", job).replace(EXAMPLE_JOB, job)
        return command

    def record(self, method: str, command: str, body: object) -> None:
        path = re.search(r"(/v1/\S*)", command).group(1)
        if method == "POST" and path == "/v1/workflow":
            self.workflow = body["WorkflowId"]
        elif method == "DELETE" and path.startswith("/v1/workflow/"):
            self.workflow = None
        elif method == "POST" and path == "/v1/job":
            self.jobs.append(body["JobId"])
        elif method == "GET" and path.endswith("/childjobs"):
            self.results["group_children"] = self.api.ok("GET", f"/v1/job/{self.jobs[1]}/childjobs")
        elif method == "GET" and path.startswith("/v1/job/"):
            self.results["device_job"] = body
        elif method == "GET" and path == "/v1/job":
            self.results["all_jobs"] = body
        elif method == "DELETE" and path.startswith("/v1/job/"):
            self.deleted += 1
