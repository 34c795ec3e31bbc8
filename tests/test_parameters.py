"""Job parameters: {{name}} placeholders filled shell-quoted, validated at the boundary, run literally."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

from ota_bridge import parameters
from ota_bridge.parameters import BadParameters
from tests.conftest import Launcher
from tests.support.processes import Service

WF = "the workflow's command"
HOSTILE = "it's a \"test\"; rm -rf / && echo $HOME `id`\nsecond line\t$(touch {marker})  "


def test_a_hostile_value_reaches_the_command_as_one_literal_argument(launch: Launcher, tmp_path: Path) -> None:
    service = launch.service()
    api = service.api
    launch.agent(service, "dev1", api.device("dev1"))
    marker = tmp_path / "injected"
    value = HOSTILE.format(marker=marker)
    workflow = api.workflow("printf '[%s]' {{v}}; printf '<%s>' \"$#\"")
    job = api.ok("POST", "/v1/job", {"WorkflowId": workflow, "DeviceId": "dev1", "Parameters": {"v": value}})["JobId"]
    done = api.wait_job(job)
    assert done["Status"] == "SUCCEEDED", done
    assert done["Result"] == f"[{value}]<0>"  # one argument, byte for byte; nothing ran but printf
    assert not marker.exists()
    assert done["Parameters"] == {"v": value}
    assert done["Command"] == f"printf '[%s]' {shlex.quote(value)}; printf '<%s>' \"$#\""


def _submit(service: Service, command: str, params: Any, **extra: Any) -> Any:
    workflow = service.api.workflow(command)
    body = {"WorkflowId": workflow, "DeviceId": "pdev", **extra}
    if params is not ...:
        body["Parameters"] = params
    return service.api.request("POST", "/v1/job", body)


@pytest.fixture(scope="module")
def registered(service: Service) -> Service:
    service.api.device("pdev")
    return service


@pytest.mark.parametrize(("command", "params", "named"), [
    ("echo {{version}}", ..., "needs a value for {{version}}"),
    ("echo {{version}}", {}, "needs a value for {{version}}"),
    ("echo {{version}}", {"version": "1", "extra": "2"}, "unknown parameter {{extra}}"),
    ("echo plain", {"version": "1"}, "has no placeholders"),
    ("echo {{version}}", {"version": True}, "must be a string or a whole number, not a boolean"),
    ("echo {{version}}", {"version": 1.5}, "not a fraction"),
    ("echo {{version}}", {"version": None}, "not null"),
    ("echo {{version}}", {"version": ["1"]}, "not a list"),
    ("echo {{version}}", {"version": "a\x00b"}, "control character U+0000"),
    ("echo {{version}}", {"version": "x" * 4097}, "at most 4096"),
    ("echo {{version}}", {"1bad": "x"}, "parameter name '1bad' does not match"),
    ("echo {{version}", {"version": "1"}, "placeholder syntax error near"),
])
def test_bad_parameters_are_refused_with_a_400_naming_the_problem(registered: Service, command: str, params: Any,
                                                                   named: str) -> None:
    answer = _submit(registered, command, params)
    assert answer.status == 400, answer.body
    assert named in answer.body["Detail"]


def test_a_workflow_with_a_placeholder_syntax_error_is_refused(registered: Service) -> None:
    answer = registered.api.request("POST", "/v1/workflow", {"Name": "w", "Command": "echo {{a}} {{b c}}"})
    assert answer.status == 400 and "placeholder syntax error" in answer.body["Detail"]


def test_whole_numbers_are_taken_and_other_braces_stay_as_they_are(registered: Service) -> None:
    answer = _submit(registered, "echo {{n}}", {"n": 42})
    assert answer.status == 200, answer.body
    assert registered.api.ok("GET", f"/v1/job/{answer.body['JobId']}")["Command"] == "echo 42"
    plain = _submit(registered, "echo '{{ not one }}' {x} }}", ...)  # no placeholder, no Parameters: as today
    job = registered.api.ok("GET", f"/v1/job/{plain.body['JobId']}")
    assert job["Command"] == "echo '{{ not one }}' {x} }}" and "Parameters" not in job


def test_render_quotes_each_value_once_and_never_rescans() -> None:
    filled = parameters.render({WF: "a {{x}} {{y}} {{x}}"}, {"x": "{{y}}", "y": ""})
    assert filled[WF] == "a '{{y}}' '' '{{y}}'"
    assert shlex.split(filled[WF]) == ["a", "{{y}}", "", "{{y}}"]


def test_render_checks_every_command_and_the_length_of_the_result() -> None:
    both = {WF: "run {{a}}", "the OnFailure workflow's command": "undo {{b}}"}
    assert parameters.render(both, {"a": "1", "b": "2"}) == {WF: "run 1", "the OnFailure workflow's command": "undo 2"}
    with pytest.raises(BadParameters, match="OnFailure workflow's command needs a value for {{b}}"):
        parameters.render(both, {"a": "1"})
    with pytest.raises(BadParameters, match="characters; at most"):
        parameters.render({WF: "{{a}}" * 10}, {"a": "x" * 4000})
