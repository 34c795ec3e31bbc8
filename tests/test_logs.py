"""--log-format json on the service and the agent: one JSON object a line, with JobId and DeviceId."""

from __future__ import annotations

import argparse
import io
import json
import logging
from typing import Any

import pytest

from agent.jsonlog import about, configure
from ota_bridge.errors import ConfigError
from ota_bridge.settings import add_arguments, resolve
from tests.conftest import Launcher

JOB = "6f1c0e4a-1111-4222-8333-944455556666"


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_a_json_line_carries_the_job_and_device_it_is_about() -> None:
    out = io.StringIO()
    try:
        configure("INFO", "json", out, device_id="dev-1")
        logging.getLogger("t").info("job %s ran", "j-1", extra=about(job_id="j-1"))
        logging.getLogger("t").warning("no job")
        logging.getLogger("t").info("device %s: job %s is %s", "dev-2", JOB, "QUEUED")
        logging.getLogger("t").info("job %r: %s", JOB, "SUCCEEDED")
    finally:
        configure("WARNING", "text")
    first, second, third, fourth = json_lines(out.getvalue())
    assert first["Message"] == "job j-1 ran" and first["JobId"] == "j-1" and first["DeviceId"] == "dev-1"
    assert first["Level"] == "INFO" and first["Logger"] == "t" and first["Time"].endswith("Z")
    assert "JobId" not in second and second["DeviceId"] == "dev-1"
    assert third["JobId"] == JOB and third["DeviceId"] == "dev-2"  # named at the message's start
    assert fourth["JobId"] == JOB and fourth["DeviceId"] == "dev-1"


def test_the_service_and_the_agent_log_json_lines(launch: Launcher) -> None:
    service = launch.service(extra=("--log-format", "json"))
    password = service.api.device("json-logs-1")
    agent = launch.agent(service, "json-logs-1", password, "--log-format", "json")
    job_id = service.api.submit(service.api.workflow("true"), DeviceId="json-logs-1")
    child = service.api.ok("GET", f"/v1/job/{job_id}/childjobs")[0]["JobId"]
    service.api.wait_job(job_id)
    service_lines = json_lines(service.log())
    assert any(line["Message"].startswith("REST API listening") for line in service_lines)
    assert not [line for line in service.log().splitlines() if " INFO " in line]  # no text lines meanwhile
    about_the_child = [line for line in service_lines if line.get("JobId") == child]
    assert all(line.get("DeviceId") == "json-logs-1" for line in about_the_child)
    # one INFO line for the result; the job's progress (IN_PROGRESS) only at DEBUG
    assert [line["Message"] for line in about_the_child if line["Level"] == "INFO"] == [
        f"device json-logs-1: job {child} is SUCCEEDED"]
    agent_lines = json_lines(agent.log())
    assert all(line["DeviceId"] == "json-logs-1" for line in agent_lines)
    about_the_job = [line for line in agent_lines if child in line["Message"]]
    assert about_the_job and all(line.get("JobId") == child for line in about_the_job)


def test_a_bad_log_format_names_the_flag_and_the_variable() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ConfigError, match="--log-format / OTA_BRIDGE_LOG_FORMAT: expected text or json"):
        resolve(parser.parse_args([]), {"OTA_BRIDGE_LOG_FORMAT": "xml"})
