"""The CLI client (`ota-bridge workflow|job|device ...`) as a person or a CI job runs it: a subprocess
against a real service, with real agents running the jobs. Its --json output is the API's answer."""

from __future__ import annotations

import argparse
import json
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from ota_bridge import settings
from ota_bridge.cli import build_parser
from ota_bridge.client.http import ServiceClient
from ota_bridge.errors import ConfigError
from tests.conftest import Launcher
from tests.support.processes import REPO, Service, _env, free_port
from tests.support.tls import ThrowawayCa

GROUP = {"ok-1": "fleet", "ok-2": "fleet", "bad-3": "fleet"}
COMMAND = 'echo "out $OTA_DEVICE_ID"; case "$OTA_DEVICE_ID" in bad-*) echo "disk full" >&2; exit 3;; esac'


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One service and three live agents in the group 'fleet'; bad-3's jobs fail."""
    launcher = Launcher(Path(tmp_path_factory.mktemp("cli")))
    try:
        service = launcher.service()
        for device, group in GROUP.items():
            launcher.agent(service, device, service.api.device(device, group=group))
        yield service
    finally:
        launcher.close()


def run(service: Service, *args: str, env: dict[str, str] | None = None, server: str | None = None,
        data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`ota-bridge ARGS` with the service's address and data dir (so its admin token), never a traceback."""
    where = ["--server", server or service.base_url, "--data-dir", str(data_dir or service.data_dir)]
    done = subprocess.run([sys.executable, "-m", "ota_bridge", *args, *where], capture_output=True, text=True,
                          timeout=60, env={**_env(), **(env or {})}, cwd=REPO)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    return done


def ok(service: Service, *args: str) -> str:
    done = run(service, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def as_json(service: Service, *args: str) -> Any:
    return json.loads(ok(service, *args, "--json"))


def refused(done: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a command that failed."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("ota-bridge: "), done.stderr
    return done.stderr


def test_workflow_create_list_show_delete(fleet: Service) -> None:
    created = as_json(fleet, "workflow", "create", "--name", "[b]hello[/b]", "--command", "uname -a",
                      "--timeout", "30")
    wid = created["WorkflowId"]
    assert ok(fleet, "workflow", "create", "--name", "other", "--command", "true").startswith("created workflow ")
    listed = ok(fleet, "workflow", "list")
    assert wid in listed and "[b]hello[/b]" in listed and "uname -a" in listed  # user text is never markup
    assert as_json(fleet, "workflow", "list") == fleet.api.ok("GET", "/v1/workflow")
    assert as_json(fleet, "workflow", "show", wid) == fleet.api.ok("GET", f"/v1/workflow/{wid}")
    shown = ok(fleet, "workflow", "show", wid)
    assert "TimeoutSeconds" in shown and "30" in shown
    assert ok(fleet, "workflow", "delete", wid).strip() == f"deleted workflow {wid}"
    gone = refused(run(fleet, "workflow", "show", wid))
    assert gone == f"ota-bridge: Not found: workflow {wid!r} does not exist\n"


def test_device_add_list_show_update_rotate_delete(fleet: Service, tmp_path: Path) -> None:
    secret = tmp_path / "cam-1.password"
    added = ok(fleet, "device", "add", "cam-1", "--group", "cams", "--tag", "north", "--tag", "v2",
               "--password-file", str(secret))
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    password = secret.read_text().strip()
    assert len(password) > 20 and password not in added and str(secret) in added
    refused(run(fleet, "device", "add", "cam-2", "--password-file", str(secret)))  # never overwrites
    assert fleet.api.request("GET", "/v1/device/cam-2").status == 404, "a refused add registered nothing"

    shown = as_json(fleet, "device", "add", "cam-2", "--group", "cams")
    assert shown["MqttUsername"] == "cam-2" and len(shown["MqttPassword"]) > 20
    assert as_json(fleet, "device", "list", "--group", "cams") == \
        fleet.api.ok("GET", "/v1/device?DeviceGroup=cams")
    assert [d["DeviceId"] for d in as_json(fleet, "device", "list", "--tag", "north")] == ["cam-1"]
    table = ok(fleet, "device", "list")
    assert all(device in table for device in (*GROUP, "cam-1", "cam-2")) and "online" in table
    assert as_json(fleet, "device", "show", "cam-1") == fleet.api.ok("GET", "/v1/device/cam-1")

    updated = as_json(fleet, "device", "update", "cam-1", "--no-group", "--tag", "south", "--disable")
    assert (updated["DeviceGroup"], updated["Tags"], updated["Enabled"]) == (None, ["south"], False)
    rotated_file = tmp_path / "cam-1.rotated"
    assert "old one no longer works" in ok(fleet, "device", "rotate", "cam-1", "--password-file", str(rotated_file))
    assert rotated_file.read_text().strip() not in ("", password)
    for device in ("cam-1", "cam-2"):
        assert ok(fleet, "device", "delete", device).strip() == f"deleted device {device}"
    assert "device 'cam-1' does not exist" in refused(run(fleet, "device", "show", "cam-1"))


def test_submit_watch_a_group_with_a_failing_device_exits_1(fleet: Service) -> None:
    workflow = fleet.api.workflow(COMMAND, name="report")
    done = run(fleet, "job", "submit", "--workflow", workflow, "--group", "fleet", "--watch", "--interval", "0.2")
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "ok-1  SUCCEEDED  exit 0  out ok-1" in lines and "ok-2  SUCCEEDED  exit 0  out ok-2" in lines
    assert "bad-3  FAILED  exit 3  disk full" in lines
    job_id = done.stderr.split()[-1]
    assert lines[-1] == f"job {job_id} FAILED: 2 succeeded, 1 failed of 3 devices; not all succeeded"

    again = run(fleet, "job", "watch", job_id, "--json")  # a finished job: the answer at once, same verdict
    assert again.returncode == 1
    assert json.loads(again.stdout)["Children"] == fleet.api.ok("GET", f"/v1/job/{job_id}/childjobs")
    assert as_json(fleet, "job", "children", job_id) == fleet.api.ok("GET", f"/v1/job/{job_id}/childjobs")
    assert as_json(fleet, "job", "show", job_id) == fleet.api.ok("GET", f"/v1/job/{job_id}")
    assert job_id in [j["JobId"] for j in as_json(fleet, "job", "list", "--limit", "5")]
    listed = ok(fleet, "job", "list")
    assert job_id in listed and "group fleet" in listed and "2 succeeded, 1 failed" in listed
    children = ok(fleet, "job", "children", job_id)
    assert "disk full" in children and "ok-2" in children
    child_ids = {c["DeviceId"]: c["JobId"] for c in fleet.api.ok("GET", f"/v1/job/{job_id}/childjobs")}
    assert run(fleet, "job", "watch", child_ids["ok-1"]).returncode == 0  # one device's part of the job
    assert run(fleet, "job", "watch", child_ids["bad-3"]).returncode == 1


def test_submit_watch_exits_0_when_every_device_succeeds(fleet: Service) -> None:
    workflow = fleet.api.workflow("echo fine", name="fine")
    done = run(fleet, "job", "submit", "--workflow", workflow, "--device", "ok-1", "--watch", "--interval", "0.2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok-1  SUCCEEDED  exit 0  fine" in done.stdout.splitlines()


def test_submit_with_parameters_and_retries_then_show_each_attempt(fleet: Service) -> None:
    workflow = as_json(fleet, "workflow", "create", "--name", "p", "--command",
                       'printf "%s|" {{v}}; [ "$OTA_DEVICE_ID" = ok-1 ]')["WorkflowId"]
    submitted = as_json(fleet, "job", "submit", "--workflow", workflow, "--device", "bad-3", "--param", "v=a b;c",
                        "--retries", "1")
    job = fleet.api.wait_job(submitted["JobId"])
    assert job["Status"] == "FAILED" and job["Retries"]["Max"] == 1 and job["Parameters"] == {"v": "a b;c"}
    [child] = fleet.api.ok("GET", f"/v1/job/{job['JobId']}/childjobs")
    shown = ok(fleet, "job", "show", child["JobId"])
    assert "#1 FAILED exit 1" in shown and "#2 FAILED exit 1" in shown and "a b;c|" in shown
    refused = run(fleet, "job", "submit", "--workflow", workflow, "--device", "ok-1", "--retry-delay", "5")
    assert refused.returncode != 0 and "--retry-delay and --retry-on need --retries" in refused.stderr


def test_a_rollout_from_the_cli_aborts_and_watch_says_why_then_pause_and_resume(fleet: Service) -> None:
    workflow = fleet.api.workflow(COMMAND, name="rolled")
    rollout = json.dumps({"Rollout": {"Waves": [50, 100]},  # bad-3 and ok-1 first: bad-3 fails, so ok-2 never runs
                          "AbortOn": [{"Status": "FAILED", "ThresholdPercent": 50, "MinFinished": 2}]})
    done = run(fleet, "job", "submit", "--workflow", workflow, "--group", "fleet", "--rollout", rollout, "--watch",
               "--interval", "0.2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "rollout: wave 1 of 2, 2 released, 0 held, ABORTED: rollout aborted: 1 of 2 finished devices ended " \
           "FAILED" in done.stdout, done.stdout
    job_id = done.stderr.split()[-1]
    assert ok(fleet, "job", "pause", job_id).strip() == f"paused job {job_id}"
    assert as_json(fleet, "job", "show", job_id)["Rollout"]["Paused"] is True
    assert as_json(fleet, "job", "resume", job_id)["Rollout"]["Paused"] is False
    assert "not a JSON object" in run(fleet, "job", "submit", "--workflow", workflow, "--group", "fleet",
                                      "--rollout", "{").stderr


def test_cancel_delete_and_interrupted_watch(fleet: Service) -> None:
    fleet.api.device("asleep")  # no agent: its job stays queued
    job_id = as_json(fleet, "job", "submit", "--workflow", fleet.api.workflow("true"), "--device", "asleep",
                     "--name", "never")["JobId"]
    watcher = subprocess.Popen([sys.executable, "-m", "ota_bridge", "job", "watch", job_id, "--server",
                                fleet.base_url, "--data-dir", str(fleet.data_dir)], env=_env(), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert watcher.stdout is not None
    assert "0/1 done (1 queued)" in watcher.stdout.readline()
    watcher.send_signal(signal.SIGINT)
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 130 and "Traceback" not in err
    assert f"job {job_id} keeps running" in err and f"ota-bridge job cancel {job_id}" in err

    assert ok(fleet, "job", "cancel", job_id).strip() == f"canceled job {job_id}"
    total = fleet.api.request("GET", "/v1/job").headers["X-Total-Count"]
    page = run(fleet, "job", "list", "--limit", "1")
    assert job_id in page.stdout and page.stderr == f"jobs 1 to 1 of {total}; --offset 1 shows the next\n"
    assert as_json(fleet, "job", "show", job_id)["Status"] == "CANCELED"
    assert run(fleet, "job", "watch", job_id).returncode == 1  # canceled is not succeeded
    assert ok(fleet, "job", "delete", job_id).strip() == f"deleted job {job_id}"
    assert "does not exist" in refused(run(fleet, "job", "show", job_id))
    assert "is not a job id" in refused(run(fleet, "job", "children", "nope"))


def test_a_refused_connection_is_one_line_naming_the_server(fleet: Service) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    line = refused(run(fleet, "job", "list", server=server))
    assert line.startswith(f"ota-bridge: cannot reach the service at {server}: connection refused")
    assert "--server" in line
    not_http = f"http://127.0.0.1:{fleet.mqtt_port}"  # the MQTT broker: no HTTP there
    assert "--server" in refused(run(fleet, "job", "list", server=not_http))


def test_a_bad_token_says_where_it_came_from_never_what_it_is(fleet: Service, tmp_path: Path) -> None:
    wrong = "not-the-token-0123456789"
    line = refused(run(fleet, "device", "list", env={"OTA_BRIDGE_TOKEN": wrong}))
    assert "Unauthorized" in line and "OTA_BRIDGE_TOKEN" in line and wrong not in line
    line = refused(run(fleet, "device", "list", data_dir=tmp_path))
    assert "no API token" in line and "--data-dir" in line and str(tmp_path / "admin-token") in line


def test_over_https_the_ca_file_decides_whom_to_trust(launch: Launcher, tmp_path: Path) -> None:
    pki = ThrowawayCa(tmp_path / "pki")
    service = launch.service(extra=("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)),
                             https=pki.context())
    line = refused(run(service, "workflow", "list"))
    assert "certificate is not trusted" in line and "--ca-file" in line
    assert as_json(service, "workflow", "list", "--ca-file", str(pki.ca_file)) == []


# --- where the token comes from (no service needed) ---------------------------------------------


def client(argv: list[str], environ: dict[str, str], data_dir: Path) -> ServiceClient:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, options=settings.CLIENT_OPTIONS)
    return ServiceClient(settings.resolve_client(parser.parse_args([*argv, "--data-dir", str(data_dir)]), environ))


def test_token_from_the_flag_then_the_variable_then_the_data_dir(tmp_path: Path) -> None:
    (tmp_path / "admin-token").write_text("from-file\n")
    env = {"OTA_BRIDGE_TOKEN": "from-env"}
    assert (client(["--token", "from-flag"], env, tmp_path).token_source, client([], env, tmp_path).token) == \
        ("--token", "from-env")
    from_file = client([], {}, tmp_path)
    assert (from_file.token, from_file.token_source) == ("from-file", str(tmp_path / "admin-token"))
    assert client([], {"OTA_BRIDGE_SERVER": "https://example.test:8443/"}, tmp_path).server == \
        "https://example.test:8443"
    with pytest.raises(ConfigError, match="--server / OTA_BRIDGE_SERVER"):
        client(["--server", "127.0.0.1:8080"], {}, tmp_path)


def test_docs_cli_md_lists_every_client_command_and_its_flags() -> None:
    doc = (REPO / "docs" / "cli.md").read_text()
    groups = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for group in ("workflow", "job", "device", "artifact"):
        actions = next(a for a in groups.choices[group]._actions if isinstance(a, argparse._SubParsersAction))
        for name, parser in actions.choices.items():
            assert f"`{group} {name}" in doc, f"docs/cli.md does not list {group} {name}"
            for flag in (s for a in parser._actions for s in a.option_strings if s.startswith("--")):
                assert flag in doc, f"docs/cli.md does not name {group} {name} {flag}"
