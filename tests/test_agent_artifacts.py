"""A real agent process fetching a job's artifacts: signed heads on a real Mosquitto (the test plays
the service, as in test_agent_daemon.py), files from a real HTTP server (tests/support/artifact_server.py).
"""

from __future__ import annotations

import hashlib
import signal
import time

import pytest

from agent.journal import read_entries
from agent.protocol import ArtifactKey, JobStatus, Key, Presence, ProgressKey
from tests import test_agent_daemon as daemon_tests
from tests.support.artifact_server import artifact_server, make_file
from tests.test_agent_daemon import DEVICE, WAIT, job, ready_agent, runs

# The Mosquitto, agent-process and pretend-service fixtures of the daemon's tests, shared.
broker, service, start_agent = daemon_tests.broker, daemon_tests.service, daemon_tests.start_agent
ran, groups_file = daemon_tests.ran, daemon_tests.groups_file

MiB = 1024 * 1024
pytestmark = pytest.mark.mosquitto


@pytest.fixture
def files():
    with artifact_server() as server:
        yield server


def artifact(files, tmp_path, name, size, seed=b"x"):
    path = tmp_path / f"served-{name}"
    sha = make_file(path, size, seed)
    return {ArtifactKey.SHA256: sha, ArtifactKey.SIZE: size, ArtifactKey.NAME: name,
            ArtifactKey.URL: files.add(name, path)}


def state_dir(tmp_path):
    return tmp_path / "state" / DEVICE


def until_not_downloading(service, job_id):
    """The DOWNLOADING reports of a job, and the first other status after them."""
    reports = []
    while (message := service.next_status())[Key.STATUS] == JobStatus.DOWNLOADING.value:
        assert message[Key.JOB_ID] == job_id and set(message) == {Key.JOB_ID, Key.STATUS, Key.PROGRESS}, message
        reports.append(message[Key.PROGRESS])
    return reports, message


def test_artifacts_are_fetched_reported_and_given_to_the_command(start_agent, service, files, tmp_path, ran,
                                                                  groups_file):
    ready_agent(start_agent, service)
    app, conf = artifact(files, tmp_path, "app.bin", 3 * MiB), artifact(files, tmp_path, "app.conf", 10, b"conf")
    command = job(ran, groups_file, "j1", 'echo "$OTA_ARTIFACT_COUNT $OTA_ARTIFACT_1_NAME $OTA_ARTIFACT_2_SHA256"; '
                  'cd "$OTA_ARTIFACT_DIR" && sha256sum app.bin "$OTA_ARTIFACT_2_PATH" | cut -c1-64; ls')
    service.publish_head("j1", command, **{Key.ARTIFACTS: [app, conf]})

    progress, started = until_not_downloading(service, "j1")
    total = 3 * MiB + 10
    assert progress[0][ProgressKey.TOTAL_BYTES] == total and progress[0][ProgressKey.BYTES] < total
    assert progress[-1] == {ProgressKey.BYTES: total, ProgressKey.TOTAL_BYTES: total}
    assert started[Key.STATUS] == JobStatus.IN_PROGRESS.value
    final = service.expect_status("j1", JobStatus.SUCCEEDED)
    assert final[Key.STDOUT].split("\n") == [f"2 app.bin {conf[ArtifactKey.SHA256]}", app[ArtifactKey.SHA256],
                                             conf[ArtifactKey.SHA256], "app.bin", "app.conf", ""]
    assert list((state_dir(tmp_path) / "jobs").iterdir()) == []  # the job's directory is gone after it

    service.publish_head("j2", job(ran, groups_file, "j2", 'sha256sum "$OTA_ARTIFACT_1_PATH"'),
                         **{Key.ARTIFACTS: [app]})
    progress, _ = until_not_downloading(service, "j2")
    assert progress[0] == {ProgressKey.BYTES: 3 * MiB, ProgressKey.TOTAL_BYTES: 3 * MiB}  # from the cache
    assert service.expect_status("j2", JobStatus.SUCCEEDED)[Key.STDOUT].startswith(app[ArtifactKey.SHA256])
    assert len(files.requests) == 2  # one per file: the second job fetched nothing
    assert runs(ran) == ["j1", "j2"]


def test_a_new_head_during_the_download_cancels_the_job_before_its_command(start_agent, service, files, tmp_path,
                                                                            ran, groups_file):
    ready_agent(start_agent, service)
    files.trickle = 0.05
    slow = artifact(files, tmp_path, "a", 8 * MiB)
    service.publish_head("j1", job(ran, groups_file, "j1"), **{Key.ARTIFACTS: [slow]})
    assert service.next_status()[Key.STATUS] == JobStatus.DOWNLOADING.value
    service.publish_head("j2", job(ran, groups_file, "j2"))

    canceled = service.expect_status("j1", JobStatus.CANCELED)
    assert canceled[Key.REASON] == "the head moved to job j2 while its artifacts downloaded"
    service.expect_status("j2", JobStatus.IN_PROGRESS)
    service.expect_status("j2", JobStatus.SUCCEEDED)
    assert runs(ran) == ["j2"]


@pytest.mark.parametrize("spoil, reason", [
    ("refuse", "the server refused the download: HTTP 403"),
    ("corrupt", "checksum mismatch: expected SHA-256 "),
])
def test_a_refused_or_corrupt_download_fails_the_job_and_nothing_runs(start_agent, service, files, tmp_path, ran,
                                                                       groups_file, spoil, reason):
    agent = ready_agent(start_agent, service)
    bad = artifact(files, tmp_path, "app.bin", MiB)
    if spoil == "refuse":
        files.refuse = 403
    else:
        (tmp_path / "served-app.bin").write_bytes(b"\0" * MiB)
    service.publish_head("j1", job(ran, groups_file, "j1"), **{Key.ARTIFACTS: [bad]})

    _, failed = until_not_downloading(service, "j1")
    assert failed[Key.STATUS] == JobStatus.FAILED.value and reason in failed[Key.REASON], failed
    assert failed[Key.EXIT_CODE] is None and runs(ran) == []
    assert list((state_dir(tmp_path) / "artifacts").iterdir()) == []
    requests = len(files.requests)
    assert agent.stop() == 0
    ready_agent(start_agent, service)  # the head comes again: the journal's result is resent, nothing fetched
    assert service.next_status() == failed and len(files.requests) == requests


def test_an_agent_killed_mid_download_resumes_from_its_part_file(start_agent, service, files, tmp_path, ran,
                                                                 groups_file):
    agent = ready_agent(start_agent, service)
    files.trickle = 0.02
    app = artifact(files, tmp_path, "app.bin", 6 * MiB)
    service.publish_head("j1", job(ran, groups_file, "j1", 'sha256sum "$OTA_ARTIFACT_1_PATH"'),
                         **{Key.ARTIFACTS: [app]})
    part = state_dir(tmp_path) / "artifacts" / f"{app[ArtifactKey.SHA256]}.part"
    deadline = time.monotonic() + WAIT
    while not (part.exists() and part.stat().st_size >= MiB):
        assert time.monotonic() < deadline, "the download never got 1 MiB in"
        time.sleep(0.01)
    agent.stop(signal.SIGKILL)
    offset = part.stat().st_size
    assert 0 < offset < app[ArtifactKey.SIZE]

    files.trickle = 0
    restarted = ready_agent(start_agent, service)
    _, started = until_not_downloading(service, "j1")
    assert started[Key.STATUS] == JobStatus.IN_PROGRESS.value
    final = service.expect_status("j1", JobStatus.SUCCEEDED)
    assert final[Key.STDOUT].startswith(app[ArtifactKey.SHA256])
    assert [r.range for r in files.requests] == [None, f"bytes={offset}-"]
    assert f"resuming at byte {offset} of {app[ArtifactKey.SIZE]}" in restarted.log()
    assert runs(ran) == ["j1"]
    assert [entry[Key.JOB_ID] for entry in read_entries(state_dir(tmp_path))] == ["j1"]
    assert hashlib.sha256((state_dir(tmp_path) / "artifacts" / app[ArtifactKey.SHA256]).read_bytes()).hexdigest() \
        == app[ArtifactKey.SHA256]


def test_sigterm_mid_download_exits_0_reports_nothing_and_the_restart_fetches_on(start_agent, service, files,
                                                                                   tmp_path, ran, groups_file):
    agent = ready_agent(start_agent, service)
    files.trickle = 0.02
    app = artifact(files, tmp_path, "app.bin", 6 * MiB)
    service.publish_head("j1", job(ran, groups_file, "j1"), **{Key.ARTIFACTS: [app]})
    part = state_dir(tmp_path) / "artifacts" / f"{app[ArtifactKey.SHA256]}.part"
    deadline = time.monotonic() + WAIT
    while not (part.exists() and part.stat().st_size >= MiB):
        assert time.monotonic() < deadline, "the download never got 1 MiB in"
        time.sleep(0.01)
    assert agent.stop() == 0
    assert "stopping its download; after a restart it fetches on" in agent.log()
    while not service.statuses.empty():  # DOWNLOADING reports only: nothing final about the job
        assert service.statuses.get()[Key.STATUS] == JobStatus.DOWNLOADING.value
    offset = part.stat().st_size

    files.trickle = 0
    ready_agent(start_agent, service)
    _, started = until_not_downloading(service, "j1")
    assert started[Key.STATUS] == JobStatus.IN_PROGRESS.value
    service.expect_status("j1", JobStatus.SUCCEEDED)
    assert [r.range for r in files.requests] == [None, f"bytes={offset}-"]


def test_a_cache_of_size_zero_keeps_nothing_after_the_job(start_agent, service, files, tmp_path, ran, groups_file):
    agent = start_agent("--artifact-cache-size", "0")
    service.expect_presence(Presence.ONLINE)
    agent.wait_for_log("subscribed to")
    app = artifact(files, tmp_path, "app.bin", MiB)
    service.publish_head("j1", job(ran, groups_file, "j1", 'test -r "$OTA_ARTIFACT_1_PATH"'),
                         **{Key.ARTIFACTS: [app]})
    until_not_downloading(service, "j1")
    service.expect_status("j1", JobStatus.SUCCEEDED)
    assert list((state_dir(tmp_path) / "artifacts").iterdir()) == []
    assert list((state_dir(tmp_path) / "jobs").iterdir()) == []
