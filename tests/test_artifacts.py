"""Artifacts, the service's side: uploads, the store, workflows and heads that name them, the device
download endpoint and DOWNLOADING reports. A real service and database; devices are played by
bare MQTT clients (tests/support/fake_device.py) and plain HTTP requests, so no agent is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
from playhouse.db_url import connect

from agent import job_signature
from agent.protocol import SIGNATURE_DOMAIN_V3, ArtifactKey, Key
from ota_bridge.client import render
from ota_bridge.client.watch import Snapshot
from ota_bridge.models import Artifact, JobArtifact, WorkflowArtifact, db
from ota_bridge.store import Store, artifacts
from tests.conftest import Launcher
from tests.support.artifact_http import get, send, upload, uploaded
from tests.support.databases import database_url
from tests.support.fake_device import FakeDevice
from tests.support.processes import REPO, Service, wait_until

LIMIT = 1024 * 1024  # the module's service takes artifacts up to 1 MiB
PAYLOAD = os.urandom(300_000)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = Service(Path(tmp_path_factory.mktemp("artifacts")),
                      extra=("--max-artifact-size", "1M", "--timeout-grace", "1"))
    service.start()
    try:
        yield service
    finally:
        service.stop()


def artifact_dir(service: Service) -> Path:
    return service.data_dir / "artifacts"


def stored_files(service: Service) -> list[str]:
    return sorted(os.listdir(artifact_dir(service)))


@pytest.fixture
def device(svc: Service, request: pytest.FixtureRequest) -> Iterator[FakeDevice]:
    """A registered device played by the test, named after it."""
    with fake_devices(svc, request.node.name[5:45].replace("_", "-"), 1) as [one]:
        yield one


@contextlib.contextmanager
def fake_devices(svc: Service, group: str, count: int) -> Iterator[list[FakeDevice]]:
    """count registered devices of one group, played by the test."""
    made = []
    try:
        for i in range(count):
            device_id = f"{group}-{i}"
            made.append(FakeDevice(svc.broker_url, device_id, svc.api.device(device_id, group=group)))
        yield made
    finally:
        for d in made:
            d.close()


def job_with(svc: Service, artifact_ids: list[str], **target: str) -> str:
    workflow = svc.api.workflow("true", Artifacts=artifact_ids)
    return svc.api.submit(workflow, **target)


def child_of(svc: Service, job_id: str) -> dict:
    job = svc.api.ok("GET", f"/v1/job/{job_id}")
    if "ParentJobId" in job:
        return job
    return svc.api.ok("GET", f"/v1/job/{job_id}/childjobs")[0]


# --- uploads ----------------------------------------------------------------------------------


def test_uploads_multipart_either_order_and_raw_keep_the_same_bytes_once(svc: Service) -> None:
    data = os.urandom(200_000)
    sha = hashlib.sha256(data).hexdigest()
    answers = [upload(svc.api, "fw.bin", "1.0", data), upload(svc.api, "fw.bin", "1.1", data, file_first=True),
               upload(svc.api, "fw-raw.bin", "2", data, raw=True)]
    assert [a.status for a in answers] == [201, 201, 201], answers
    bodies = [a.json for a in answers]
    assert {b["Sha256"] for b in bodies} == {sha} and {b["Size"] for b in bodies} == {len(data)}
    assert [(b["Name"], b["Version"]) for b in bodies] == [("fw.bin", "1.0"), ("fw.bin", "1.1"), ("fw-raw.bin", "2")]
    assert len({b["ArtifactId"] for b in bodies}) == 3 and all(b["Created"].endswith("Z") for b in bodies)
    assert stored_files(svc).count(sha) == 1
    assert (artifact_dir(svc) / sha).read_bytes() == data
    assert not [f for f in stored_files(svc) if f.startswith(".upload-")]


def peak_rss(service: Service) -> int:
    """The service process's peak resident memory so far (VmHWM), in bytes."""
    assert service.proc is not None
    status = Path(f"/proc/{service.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def test_uploads_are_streamed_to_disk_not_held_in_memory(launch: Launcher, tmp_path: Path) -> None:
    service = launch.service()
    size = 32 * 2**20
    (tmp_path / "big.bin").write_bytes(os.urandom(size))
    uploaded(service.api, "warm-up.bin", os.urandom(2 * 2**20))  # the upload path's code, buffers and threads
    before = peak_rss(service)
    auth = f"Authorization: Bearer {service.api.token}"
    for how in (["-F", "Name=big.bin", "-F", "Version=1", "-F", f"File=@{tmp_path / 'big.bin'}"],
                ["-H", "Content-Type: application/octet-stream", "--data-binary", f"@{tmp_path / 'big.bin'}"]):
        answer = json.loads(curl("-H", auth, *how, f"{service.base_url}/v1/artifact?"
                                 + ("Name=big.bin&Version=1" if "--data-binary" in how else "")))
        assert answer["Size"] == size
    grown = peak_rss(service) - before
    assert grown < size // 4, f"the service's peak memory grew by {grown} bytes during the uploads"


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "multipart"])
def test_an_upload_over_the_limit_is_413_naming_it_and_leaves_nothing(svc: Service, raw: bool) -> None:
    before = stored_files(svc)
    total = get(svc.api, "/v1/artifact").headers["X-Total-Count"]
    answer = upload(svc.api, "big.bin", "1", os.urandom(LIMIT + 1), raw=raw)
    assert answer.status == 413, answer
    assert str(LIMIT) in answer.json["Detail"] and "--max-artifact-size" in answer.json["Detail"]
    assert stored_files(svc) == before
    assert get(svc.api, "/v1/artifact").headers["X-Total-Count"] == total


def test_an_upload_cut_off_by_its_client_leaves_nothing(svc: Service) -> None:
    before = stored_files(svc)
    with socket.create_connection(("127.0.0.1", svc.http_port), timeout=10) as conn:
        conn.sendall(f"POST /v1/artifact?Name=cut.bin&Version=1 HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {svc.api.token}\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: {LIMIT}\r\n\r\n".encode() + os.urandom(LIMIT // 2))
        wait_until(lambda: [f for f in stored_files(svc) if f.startswith(".upload-")], 15, "the upload to begin")
    wait_until(lambda: stored_files(svc) == before, 15, "the cut upload's temporary file to go")
    assert not [a for a in get(svc.api, "/v1/artifact?Limit=1000").json if a["Name"] == "cut.bin"]


@pytest.mark.parametrize("name, version, raw, named", [
    ("../etc/passwd", "1", False, "Name"), ("has space", "1", True, "Name"), (".hidden", "1", False, "Name"),
    ("ok.bin", "", True, "Version"), ("ok.bin", "1\n2", False, "Version"),
])
def test_a_bad_name_or_version_is_400_naming_it_and_stores_nothing(svc: Service, name: str, version: str, raw: bool,
                                                                    named: str) -> None:
    before = stored_files(svc)
    answer = upload(svc.api, name, version, b"some bytes", raw=raw, file_first=True)
    assert answer.status == 400 and named in answer.json["Detail"], answer
    assert stored_files(svc) == before


def curl(*args: str) -> bytes:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    done = subprocess.run(["curl", "-sS", "--fail-with-body", *args], check=True, capture_output=True, timeout=30)
    return done.stdout


def test_curl_uploads_as_the_docs_show_and_resumes_a_cut_download(svc: Service, device: FakeDevice,
                                                                   tmp_path: Path) -> None:
    data = os.urandom(150_000)
    (tmp_path / "fw.bin").write_bytes(data)
    auth = f"Authorization: Bearer {svc.api.token}"
    form = json.loads(curl("-H", auth, "-F", "Name=fw.bin", "-F", "Version=1.2", "-F", f"File=@{tmp_path / 'fw.bin'}",
                           f"{svc.base_url}/v1/artifact"))
    raw = json.loads(curl("-H", auth, "-H", "Content-Type: application/octet-stream", "--data-binary",
                          f"@{tmp_path / 'fw.bin'}", f"{svc.base_url}/v1/artifact?Name=fw.bin&Version=1.2"))
    assert form["Sha256"] == raw["Sha256"] == hashlib.sha256(data).hexdigest() and form["Size"] == len(data)
    url, _ = artifact_url(svc, device, data)
    (tmp_path / "got.bin").write_bytes(data[:40_000])  # a download cut after 40,000 bytes
    curl("-C", "-", "-o", str(tmp_path / "got.bin"), url)  # continues with Range: bytes=40000-
    assert (tmp_path / "got.bin").read_bytes() == data


def test_an_upload_without_a_file_or_with_another_type_is_400(svc: Service) -> None:
    auth = {"Authorization": f"Bearer {svc.api.token}"}
    answer = send(f"{svc.api.base}/v1/artifact", "POST", b"{}", {**auth, "Content-Type": "application/json"})
    assert answer.status == 400 and "multipart/form-data" in answer.json["Detail"]
    from tests.support.artifact_http import multipart
    body, kind = multipart([("Name", b"x", None), ("Version", b"1", None)])
    answer = send(f"{svc.api.base}/v1/artifact", "POST", body, {**auth, "Content-Type": kind})
    assert answer.status == 400 and "File" in answer.json["Detail"]


def test_list_get_and_content(svc: Service) -> None:
    first, second = uploaded(svc.api, "a.bin", b"first"), uploaded(svc.api, "b.bin", b"second")
    page = get(svc.api, "/v1/artifact?Limit=1")
    assert page.status == 200 and int(page.headers["X-Total-Count"]) >= 2
    assert [a["ArtifactId"] for a in page.json] == [second["ArtifactId"]]  # newest first
    assert get(svc.api, f"/v1/artifact/{first['ArtifactId']}").json == first
    content = get(svc.api, f"/v1/artifact/{first['ArtifactId']}/content")
    assert content.status == 200 and content.body == b"first"
    assert content.headers["ETag"] == f'"{first["Sha256"]}"'
    assert 'filename="a.bin"' in content.headers["Content-Disposition"]
    assert get(svc.api, "/v1/artifact/231ec702-5f6e-4b4d-9c1a-0d2c8e3f4a5b").status == 404
    assert svc.api.request("GET", "/v1/artifact", token=None).status == 401


def test_delete_is_409_naming_the_pending_job_then_removes_the_file_with_its_last_record(svc: Service,
                                                                                       device: FakeDevice) -> None:
    data = os.urandom(1000)
    sha = hashlib.sha256(data).hexdigest()
    kept, needed = uploaded(svc.api, "k.bin", data), uploaded(svc.api, "n.bin", data)
    job_id = job_with(svc, [needed["ArtifactId"]], DeviceId=device.device_id)
    refused = svc.api.request("DELETE", f"/v1/artifact/{needed['ArtifactId']}")
    assert refused.status == 409 and job_id in refused.body["Detail"]
    svc.api.ok("POST", f"/v1/job/{job_id}/cancel")
    assert svc.api.ok("DELETE", f"/v1/artifact/{needed['ArtifactId']}") == {"ArtifactId": needed["ArtifactId"],
                                                                            "Deleted": True}
    assert sha in stored_files(svc)  # another record still names the bytes
    svc.api.ok("DELETE", f"/v1/artifact/{kept['ArtifactId']}")
    assert sha not in stored_files(svc)
    assert svc.api.request("GET", f"/v1/artifact/{kept['ArtifactId']}").status == 404


# --- workflows and heads --------------------------------------------------------------------------


def test_a_workflow_names_artifacts_that_exist(svc: Service) -> None:
    artifact = uploaded(svc.api, "w.bin", b"w")
    unknown = "231ec702-5f6e-4b4d-9c1a-0d2c8e3f4a5b"
    refused = svc.api.request("POST", "/v1/workflow", {"Name": "w", "Command": "true",
                                                       "Artifacts": [artifact["ArtifactId"], unknown]})
    assert refused.status == 400 and unknown in refused.body["Detail"]
    workflow = svc.api.workflow("true", Artifacts=[artifact["ArtifactId"]])
    assert svc.api.ok("GET", f"/v1/workflow/{workflow}")["Artifacts"] == [artifact["ArtifactId"]]
    too_many = svc.api.request("POST", "/v1/workflow", {"Name": "w", "Command": "true",
                                                        "Artifacts": [artifact["ArtifactId"]] * 17})
    assert too_many.status == 400 and "Artifacts" in too_many.body["Detail"]
    same_file = svc.api.request("POST", "/v1/workflow", {"Name": "w", "Command": "true", "Artifacts": [
        artifact["ArtifactId"], uploaded(svc.api, "w.bin", b"another w")["ArtifactId"]]})
    assert same_file.status == 400 and "'w.bin'" in same_file.body["Detail"]
    svc.api.device("names-artifacts")
    svc.api.ok("DELETE", f"/v1/artifact/{artifact['ArtifactId']}")  # no job needs it
    gone = svc.api.request("POST", "/v1/job", {"WorkflowId": workflow, "DeviceId": "names-artifacts"})
    assert gone.status == 400 and artifact["ArtifactId"] in gone.body["Detail"] and "deleted" in gone.body["Detail"]
    assert svc.api.ok("GET", "/v1/device/names-artifacts")["PendingJobs"] == 0  # nothing half-written
    svc.api.ok("DELETE", f"/v1/workflow/{workflow}")  # its list of artifacts goes with it


def test_the_head_carries_the_artifacts_signed_and_a_job_keeps_its_copy(svc: Service, device: FakeDevice) -> None:
    one, two = uploaded(svc.api, "one.bin", PAYLOAD), uploaded(svc.api, "two.tar", b"two")
    job_id = job_with(svc, [one["ArtifactId"], two["ArtifactId"]], DeviceId=device.device_id)
    uploaded(svc.api, "one.bin", b"a later upload changes no job", version="2")
    head = device.head_for(child_of(svc, job_id)["JobId"])
    assert [(a[ArtifactKey.NAME], a[ArtifactKey.SHA256], a[ArtifactKey.SIZE]) for a in head[Key.ARTIFACTS]] == [
        ("one.bin", one["Sha256"], len(PAYLOAD)), ("two.tar", two["Sha256"], 3)]
    keys = job_signature.parse_public_keys(svc.signing_key_file.read_text())
    content = job_signature.signed_content(head)
    assert content is not None and content.startswith(SIGNATURE_DOMAIN_V3.encode())
    assert job_signature.signature_problem(head[Key.SIGNATURE], content, keys) is None
    tampered = {**head, Key.ARTIFACTS: [{**head[Key.ARTIFACTS][0], ArtifactKey.SHA256: "0" * 64}]}
    assert job_signature.signature_problem(head[Key.SIGNATURE], job_signature.signed_content(tampered), keys)
    url = head[Key.ARTIFACTS][0][ArtifactKey.URL]
    assert url.startswith(f"{svc.base_url}/v1/device-artifact/{one['Sha256']}?")


def test_a_head_without_artifacts_stays_v2(svc: Service, device: FakeDevice) -> None:
    job_id = svc.api.submit(svc.api.workflow("true"), DeviceId=device.device_id)
    head = device.head_for(child_of(svc, job_id)["JobId"])
    assert Key.ARTIFACTS not in head and Key.ATTEMPT not in head
    assert job_signature.signed_content(head).startswith(b"ota-bridge job v2\n")


def test_with_an_artifact_base_url_heads_point_there(launch: Launcher) -> None:
    service = launch.service(extra=("--artifact-base-url", "https://cdn.example.com/ota/"))
    artifact = uploaded(service.api, "cdn.bin", b"cdn")
    device = FakeDevice(service.broker_url, "cdn-dev", service.api.device("cdn-dev"))
    try:
        job_id = job_with(service, [artifact["ArtifactId"]], DeviceId="cdn-dev")
        head = device.head_for(child_of(service, job_id)["JobId"])
        assert head[Key.ARTIFACTS][0][ArtifactKey.URL] == f"https://cdn.example.com/ota/{artifact['Sha256']}"
        keys = job_signature.parse_public_keys(service.signing_key_file.read_text())
        assert job_signature.signature_problem(head[Key.SIGNATURE], job_signature.signed_content(head), keys) is None
    finally:
        device.close()


# --- the device download endpoint -----------------------------------------------------------------


def artifact_url(svc: Service, device: FakeDevice, data: bytes = PAYLOAD) -> tuple[str, str]:
    """(the head's Url of a new job's one artifact, the job's id)."""
    artifact = uploaded(svc.api, "dl.bin", data)
    job_id = job_with(svc, [artifact["ArtifactId"]], DeviceId=device.device_id)
    head = device.head_for(child_of(svc, job_id)["JobId"])
    return head[Key.ARTIFACTS][0][ArtifactKey.URL], job_id


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | changes
    return parts._replace(query="&".join(f"{k}={v}" for k, v in query.items())).geturl()


def test_a_device_fetches_its_file_whole_or_from_an_offset(svc: Service, device: FakeDevice) -> None:
    url, _ = artifact_url(svc, device)
    whole = send(url)
    assert whole.status == 200 and whole.body == PAYLOAD
    assert whole.headers["ETag"] == f'"{hashlib.sha256(PAYLOAD).hexdigest()}"'
    assert int(whole.headers["Content-Length"]) == len(PAYLOAD) and whole.headers["Accept-Ranges"] == "bytes"
    rest = send(url, headers={"Range": "bytes=123456-"})
    assert rest.status == 206 and rest.body == PAYLOAD[123456:]
    assert rest.headers["Content-Range"] == f"bytes 123456-{len(PAYLOAD) - 1}/{len(PAYLOAD)}"
    middle = send(url, headers={"Range": "bytes=10-19"})
    assert middle.status == 206 and middle.body == PAYLOAD[10:20]
    beyond = send(url, headers={"Range": f"bytes={len(PAYLOAD)}-"})
    assert beyond.status == 416 and beyond.headers["Content-Range"] == f"bytes */{len(PAYLOAD)}"


def test_a_link_fetches_nothing_for_another_device_job_or_token(svc: Service) -> None:
    with fake_devices(svc, "dl-others", 2) as (first, second):
        url, job_id = artifact_url(svc, first)
        other_url, other_job = artifact_url(svc, second, b"the other device's bytes")
        token = parse_qs(urlsplit(url).query)["token"][0]
        for bad in (with_query(url, device=second.device_id), with_query(url, job=child_of(svc, other_job)["JobId"]),
                    with_query(url, token="0" * 64), with_query(url, token=token[:-1]),
                    with_query(other_url, device=first.device_id),
                    url.replace(urlsplit(url).path.rsplit("/", 1)[1], hashlib.sha256(b"x").hexdigest())):
            answer = send(bad)
            assert answer.status == 403, (bad, answer)
            assert token not in answer.body.decode()
        assert send(url).status == 200
        svc.api.ok("PATCH", f"/v1/device/{first.device_id}", {"Enabled": False})
        assert send(url).status == 403  # a disabled device's links stop working
        svc.api.ok("PATCH", f"/v1/device/{first.device_id}", {"Enabled": True})
        assert send(url).status == 200
        svc.api.ok("POST", f"/v1/job/{job_id}/cancel")
        assert send(url).status == 403  # the job is final
        assert token not in svc.log()


def test_a_file_missing_from_the_directory_is_404(svc: Service, device: FakeDevice) -> None:
    data = os.urandom(100)
    url, _ = artifact_url(svc, device, data)
    (artifact_dir(svc) / hashlib.sha256(data).hexdigest()).unlink()
    assert send(url).status == 404
    assert send(f"{svc.base_url}/v1/device-artifact/not-a-sha?device=d&job=j&token=t").status == 404


# --- DOWNLOADING reports --------------------------------------------------------------------------


def test_downloading_progress_shows_in_the_child_and_the_parent_counts(svc: Service) -> None:
    with fake_devices(svc, "progress", 2) as devices:
        artifact = uploaded(svc.api, "p.bin", PAYLOAD)
        job_id = job_with(svc, [artifact["ArtifactId"]], DeviceGroup="progress")
        first = devices[0]
        child = next(c for c in svc.api.ok("GET", f"/v1/job/{job_id}/childjobs") if c["DeviceId"] == first.device_id)
        first.head_for(child["JobId"])
        assert child["Download"] is None
        for done in (1000, 250_000):
            first.report(child["JobId"], "DOWNLOADING", Progress={"Bytes": done, "TotalBytes": len(PAYLOAD)})
            wait_until(lambda d=done: child_of(svc, child["JobId"])["Download"] == {"Bytes": d,
                                                                                    "TotalBytes": len(PAYLOAD)},
                       15, f"progress {done}")
        assert child_of(svc, child["JobId"])["Status"] == "DOWNLOADING"
        parent = svc.api.ok("GET", f"/v1/job/{job_id}")
        assert parent["Result"]["DOWNLOADING"] == 1 and parent["Result"]["QUEUED"] == 1
        assert parent["Status"] == "IN_PROGRESS"
        children = svc.api.ok("GET", f"/v1/job/{job_id}/childjobs")  # as `job watch` and `job children` show them
        fetching = next(c for c in children if c["Status"] == "DOWNLOADING")
        assert render.outcome(fetching) == "downloading 244.1 KiB of 293.0 KiB (83%)"
        assert Snapshot(parent, children).summary() == ("1 queued, 1 downloading; "
                                                        "downloading 244.1 KiB of 293.0 KiB (83%)")


def test_the_silence_clock_starts_at_in_progress_not_while_downloading(svc: Service, device: FakeDevice) -> None:
    artifact = uploaded(svc.api, "slow.bin", b"slow")
    workflow = svc.api.workflow("true", Artifacts=[artifact["ArtifactId"]], TimeoutSeconds=1)
    child_id = child_of(svc, svc.api.submit(workflow, DeviceId=device.device_id))["JobId"]
    device.head_for(child_id)
    device.report(child_id, "DOWNLOADING", Progress={"Bytes": 1, "TotalBytes": 4})
    wait_until(lambda: child_of(svc, child_id)["Status"] == "DOWNLOADING", 15, "DOWNLOADING")
    time.sleep(3)  # past the timeout (1 s) plus the grace (1 s), and the checks every 0.5 s
    assert child_of(svc, child_id)["Status"] == "DOWNLOADING"
    device.report(child_id, "IN_PROGRESS")
    wait_until(lambda: child_of(svc, child_id)["Status"] == "TIMED_OUT", 20, "the silent device's job to time out")


# --- a database made before artifacts -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_database_made_before_artifacts_gets_their_tables_and_columns(kind: str, tmp_path: Path) -> None:
    with database_url(kind, tmp_path) as url:
        Store(url).close()
        old = connect(url)  # take away what this change added
        for column in NEW_COLUMNS:
            old.execute_sql(f'ALTER TABLE child_job DROP COLUMN "{column}"')
        old.drop_tables([JobArtifact, WorkflowArtifact, Artifact])
        assert not NEW_COLUMNS & {c.name for c in old.get_columns("child_job")}
        old.close()
        store = Store(url)
        try:
            assert NEW_COLUMNS <= store.call_sync(lambda: {c.name for c in db.get_columns("child_job")})
            assert store.call_sync(artifacts.list_artifacts, 10, 0) == ([], 0)
        finally:
            store.close()


NEW_COLUMNS = {"download_bytes", "download_total"}


def cli(svc: Service, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ota_bridge", *argv, f"--server={svc.base_url}",
                           f"--token={svc.api.token}"], capture_output=True, text=True, timeout=30, cwd=REPO)


def test_the_cli_uploads_lists_and_deletes_artifacts_and_names_them_in_workflows(svc: Service,
                                                                                 tmp_path: Path) -> None:
    data = os.urandom(600 * 1024)
    (tmp_path / "cli-fw.bin").write_bytes(data)
    done = cli(svc, "artifact", "upload", str(tmp_path / "cli-fw.bin"), "--version", "3.1", "--json")
    assert done.returncode == 0, done.stderr
    artifact = json.loads(done.stdout)
    assert (artifact["Name"], artifact["Version"], artifact["Size"]) == ("cli-fw.bin", "3.1", len(data))
    assert artifact["Sha256"] == hashlib.sha256(data).hexdigest()
    listed = cli(svc, "artifact", "list")
    assert listed.returncode == 0 and artifact["ArtifactId"] in listed.stdout and "600.0 KiB" in listed.stdout
    refused = cli(svc, "artifact", "upload", str(tmp_path / "cli-fw.bin"), "--version", "1", "--name", "../x")
    assert refused.returncode != 0 and "Name" in refused.stderr
    done = cli(svc, "workflow", "create", "--name", "cli", "--command", "true", "--artifact", artifact["ArtifactId"],
               "--json")
    assert done.returncode == 0, done.stderr
    workflow = svc.api.ok("GET", f"/v1/workflow/{json.loads(done.stdout)['WorkflowId']}")
    assert workflow["Artifacts"] == [artifact["ArtifactId"]]
    deleted = cli(svc, "artifact", "delete", artifact["ArtifactId"])
    assert deleted.returncode == 0 and f"deleted artifact {artifact['ArtifactId']}" in deleted.stdout
