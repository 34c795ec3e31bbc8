"""agent/download.py and agent/artifact_cache.py against a real HTTP server (tests/support/artifact_server.py):
resume with Range, servers that ignore it, cuts, checksum and size mismatches, the disk-space check,
the cache and its bound, and a 50 MB download whose memory stays flat."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from agent.artifact_cache import Artifact, ArtifactCache
from agent.download import (
    DownloadCanceled,
    DownloadError,
    JobDownload,
    Progress,
    RetryPolicy,
    artifact_environment,
    progress_message,
)
from tests.support.artifact_server import artifact_server, make_file
from tests.support.processes import REPO

FAST = RetryPolicy(first_delay=0.01, max_delay=0.05, attempts=3)
MiB = 1024 * 1024


@pytest.fixture
def server():
    with artifact_server() as server:
        yield server


@pytest.fixture
def cache(tmp_path):
    cache = ArtifactCache(tmp_path / "state", max_bytes=1024**3)
    cache.open()
    return cache


def served(server, tmp_path, name, size, seed=b"x"):
    path = tmp_path / f"served-{name}"
    sha = make_file(path, size, seed)
    return Artifact(sha, size, name, server.add(name, path)), path


def download(cache, *artifacts, progress=None, retry=FAST, job_id="job-1"):
    job = JobDownload(job_id, artifacts, cache, retry=retry, read_timeout=5,
                      on_progress=(progress.append if progress is not None else lambda p: None))
    job.run()
    return job


def test_a_download_is_checked_and_cached_by_its_sha256(server, cache, tmp_path):
    artifact, source = served(server, tmp_path, "app.bin", 3 * MiB + 17)
    progress: list[Progress] = []
    download(cache, artifact, progress=progress)
    cached = cache.complete_path(artifact.sha256)
    assert cached.read_bytes() == source.read_bytes()
    assert not cache.part_path(artifact.sha256).exists()
    assert cached.stat().st_mode & 0o777 == 0o444  # a command cannot change it by accident
    assert [r.range for r in server.requests] == [None]
    assert progress[0] == Progress(0, artifact.size) and progress[-1] == Progress(artifact.size, artifact.size)


def test_a_cut_download_resumes_with_range_from_where_it_stopped(server, cache, tmp_path):
    artifact, source = served(server, tmp_path, "app.bin", 2 * MiB)
    server.cut_after, server.cuts = MiB + 5, 1
    progress: list[Progress] = []
    download(cache, artifact, progress=progress)
    assert [r.range for r in server.requests] == [None, f"bytes={MiB + 5}-"]
    assert cache.complete_path(artifact.sha256).read_bytes() == source.read_bytes()
    assert Progress(MiB + 5, 2 * MiB) in progress  # reported as the link broke


def test_a_part_file_left_by_a_dead_agent_is_resumed_after_hashing_it(server, cache, tmp_path):
    artifact, source = served(server, tmp_path, "app.bin", MiB)
    cache.part_path(artifact.sha256).write_bytes(source.read_bytes()[:300_000])
    progress: list[Progress] = []
    download(cache, artifact, progress=progress)
    assert [r.range for r in server.requests] == ["bytes=300000-"]
    assert cache.complete_path(artifact.sha256).read_bytes() == source.read_bytes()
    assert Progress(300_000, MiB) in progress


def test_a_server_that_ignores_range_still_ends_with_the_right_bytes(server, cache, tmp_path):
    artifact, source = served(server, tmp_path, "app.bin", 2 * MiB)
    server.ignore_range, server.cut_after, server.cuts = True, MiB, 1
    download(cache, artifact)
    assert [r.range for r in server.requests] == [None, f"bytes={MiB}-"]  # asked, got a 200, started over
    assert cache.complete_path(artifact.sha256).read_bytes() == source.read_bytes()


def test_a_checksum_mismatch_deletes_the_file_and_fails_saying_both_sums(server, cache, tmp_path):
    artifact, source = served(server, tmp_path, "app.bin", MiB)
    data = bytearray(source.read_bytes())
    data[1000] ^= 0xFF
    source.write_bytes(bytes(data))
    got = hashlib.sha256(data).hexdigest()
    with pytest.raises(DownloadError, match=f"checksum mismatch: expected SHA-256 {artifact.sha256}, got {got}"):
        download(cache, artifact)
    assert list(cache.root.iterdir()) == []


def test_a_part_file_with_wrong_bytes_is_fetched_once_more_whole_and_then_right(server, cache, tmp_path):
    """A power cut can leave garbage at the end of a part file: the resumed file fails its checksum,
    so it is fetched again from the start rather than failing the job."""
    artifact, source = served(server, tmp_path, "app.bin", MiB)
    cache.part_path(artifact.sha256).write_bytes(b"\0" * 300_000)
    download(cache, artifact)
    assert [r.range for r in server.requests] == ["bytes=300000-", None]
    assert cache.complete_path(artifact.sha256).read_bytes() == source.read_bytes()


def test_a_size_the_server_disagrees_with_fails_before_the_body(server, cache, tmp_path):
    artifact, source = served(server, tmp_path, "app.bin", MiB)
    source.write_bytes(source.read_bytes()[:-1])
    with pytest.raises(DownloadError, match=f"size mismatch: expected {MiB} bytes, the server has {MiB - 1}"):
        download(cache, artifact)
    assert list(cache.root.iterdir()) == []


def test_not_enough_disk_space_fails_before_any_request(server, cache, tmp_path):
    artifact, _ = served(server, tmp_path, "app.bin", 1000)
    huge = Artifact(artifact.sha256, 2**62, artifact.name, artifact.url)  # more than any disk here
    with pytest.raises(DownloadError, match=rf"not enough disk space: need {2**62} bytes, have \d+ bytes"):
        download(cache, huge)
    assert server.requests == []


def test_a_refusal_fails_at_once_with_the_status(server, cache, tmp_path):
    artifact, _ = served(server, tmp_path, "app.bin", 1000)
    server.refuse = 403
    secret = Artifact(artifact.sha256, artifact.size, artifact.name, artifact.url + "?token=s3cret")
    with pytest.raises(DownloadError, match="the server refused the download: HTTP 403") as refused:
        download(cache, secret, retry=RetryPolicy(first_delay=5, attempts=10))
    assert len(server.requests) == 1
    assert str(refused.value).endswith(f"({artifact.url})")  # the link's query (a token) stays out of the Reason


def test_it_gives_up_after_the_tries_in_a_row_without_progress(cache, tmp_path):
    with artifact_server() as gone:
        url = gone.base_url + "/app.bin"
    artifact = Artifact("0" * 64, 10, "app.bin", url)  # nothing listens there any more
    with pytest.raises(DownloadError, match="gave up after 3 tries in a row without progress; the last: the request"):
        download(cache, artifact)


def test_a_cache_hit_makes_no_request_and_the_same_bytes_twice_are_fetched_once(server, cache, tmp_path):
    artifact, _ = served(server, tmp_path, "app.bin", 100_000)
    twin = Artifact(artifact.sha256, artifact.size, "copy.bin", artifact.url)
    download(cache, artifact, twin)
    assert len(server.requests) == 1
    progress: list[Progress] = []
    download(cache, artifact, progress=progress, job_id="job-2")
    assert len(server.requests) == 1
    assert progress == [Progress(100_000, 100_000)] * 2  # at the start and the end; the same bytes count once
    job_dir, paths = cache.link_job("job-2", [artifact, twin])
    assert [p.name for p in paths] == ["app.bin", "copy.bin"] and paths[0].samefile(paths[1])


def test_a_cached_file_changed_on_disk_is_fetched_again(server, cache, tmp_path):
    artifact, source = served(server, tmp_path, "app.bin", 100_000)
    download(cache, artifact)
    cached = cache.complete_path(artifact.sha256)
    cached.chmod(0o644)
    cached.write_bytes(b"changed")
    download(cache, artifact)
    assert len(server.requests) == 2 and cached.read_bytes() == source.read_bytes()


def test_the_cache_keeps_the_most_recently_used_within_its_bound(server, tmp_path):
    cache = ArtifactCache(tmp_path / "state", max_bytes=250_000)
    cache.open()
    artifacts = [served(server, tmp_path, f"a{n}.bin", 100_000, seed=bytes([n]))[0] for n in range(3)]
    for n, artifact in enumerate(artifacts):
        download(cache, artifact, job_id=f"job-{n}")
        os.utime(cache.complete_path(artifact.sha256), ns=(n * 10**9, n * 10**9))  # used in this order
    cache.link_job("job-x", [artifacts[0]])  # a0 is used again: now the most recent
    assert cache.evict() == [artifacts[1].sha256]
    assert sorted(p.name for p in cache.root.iterdir()) == sorted([artifacts[0].sha256, artifacts[2].sha256])
    assert cache.evict(keep=[artifacts[2].sha256]) == []  # within the bound already


def test_a_cache_of_size_zero_keeps_only_the_current_jobs_files(server, tmp_path):
    cache = ArtifactCache(tmp_path / "state", max_bytes=0)
    cache.open()
    old, _ = served(server, tmp_path, "old.bin", 1000, seed=b"old")
    new, _ = served(server, tmp_path, "new.bin", 1000, seed=b"new")
    download(cache, old)
    download(cache, new, job_id="job-2")  # makes room first: the old file goes, never the new one
    assert [p.name for p in cache.root.iterdir()] == [new.sha256]
    cache.evict()  # after the job
    assert list(cache.root.iterdir()) == []


def start_in_thread(job: JobDownload) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            job.run()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


@pytest.mark.parametrize("pause", [0.02, 120.0], ids=["flowing", "quiet link"])
def test_cancel_stops_the_download_and_keeps_the_part_for_later(server, cache, tmp_path, pause):
    """A quiet link (the server waits 2 minutes between chunks) does not hold a cancel up: the read is
    woken, long before its 60 s read timeout."""
    artifact, _ = served(server, tmp_path, "app.bin", 4 * MiB)
    server.trickle = pause
    job = JobDownload("job-1", [artifact], cache, retry=FAST, read_timeout=60)
    thread, errors = start_in_thread(job)
    while cache.part_size(artifact.sha256) < 64 * 1024 and thread.is_alive():
        thread.join(0.01)
    job.cancel("the head moved on")
    thread.join(30)
    assert not thread.is_alive()
    assert isinstance(errors[0], DownloadCanceled) and str(errors[0]) == "the head moved on"
    assert 0 < cache.part_size(artifact.sha256) < artifact.size


def test_the_command_environment_names_each_artifact(tmp_path):
    artifacts = [Artifact("a" * 64, 1, "one.tar", "http://h/1"), Artifact("b" * 64, 2, "two.deb", "http://h/2")]
    job_dir = tmp_path / "jobs" / "j"
    env = artifact_environment(job_dir, [job_dir / "one.tar", job_dir / "two.deb"], artifacts)
    assert env == {"OTA_ARTIFACT_DIR": str(job_dir), "OTA_ARTIFACT_COUNT": "2",
                   "OTA_ARTIFACT_1_PATH": str(job_dir / "one.tar"), "OTA_ARTIFACT_1_NAME": "one.tar",
                   "OTA_ARTIFACT_1_SHA256": "a" * 64,
                   "OTA_ARTIFACT_2_PATH": str(job_dir / "two.deb"), "OTA_ARTIFACT_2_NAME": "two.deb",
                   "OTA_ARTIFACT_2_SHA256": "b" * 64}


def test_a_downloading_report_names_the_attempt_from_the_second_on():
    assert progress_message("j1", Progress(5, 10)) == {
        "JobId": "j1", "Status": "DOWNLOADING", "Progress": {"Bytes": 5, "TotalBytes": 10}}
    assert progress_message("j1", Progress(5, 10), attempt=1) == progress_message("j1", Progress(5, 10))
    assert progress_message("j1", Progress(5, 10), attempt=3)["Attempt"] == 3


def test_two_artifacts_of_one_name_are_refused(cache):
    same = [Artifact("a" * 64, 1, "x.bin", "http://h/1"), Artifact("b" * 64, 1, "x.bin", "http://h/2")]
    with pytest.raises(DownloadError, match="two artifacts are named x.bin"):
        download(cache, *same)


MEMORY_PROBE = textwrap.dedent("""
    import json, sys, urllib.request
    from pathlib import Path
    from agent.artifact_cache import Artifact, ArtifactCache
    from agent.download import JobDownload

    def peak_kib():  # this process image's peak resident size (ru_maxrss would include the parent's, from fork)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    small, big, state, naive = json.loads(sys.argv[1])
    cache = ArtifactCache(Path(state), max_bytes=1 << 40)
    cache.open()
    JobDownload("warm-up", [Artifact(**small)], cache).run()  # every module and buffer in place
    before = peak_kib()
    if naive:  # what a download that holds the body in memory would do: the probe must see it
        Path(state, "naive").write_bytes(urllib.request.urlopen(big["url"]).read())
    else:
        JobDownload("big", [Artifact(**big)], cache).run()
    print(json.dumps({"before_kib": before, "after_kib": peak_kib()}))
""")


def peak_growth_mib(artifacts, state, naive=False):
    spec = [{"sha256": a.sha256, "size": a.size, "name": a.name, "url": a.url} for a in artifacts]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, json.dumps([*spec, str(state), naive])],
                          capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    rss = json.loads(done.stdout)
    return (rss["after_kib"] - rss["before_kib"]) / 1024


def test_memory_stays_flat_while_a_50_mb_file_downloads(server, tmp_path):
    """The downloading process's peak resident size grows by far less than the file."""
    small, _ = served(server, tmp_path, "small.bin", MiB, seed=b"small")
    big, _ = served(server, tmp_path, "big.bin", 50 * MiB, seed=b"big")
    growth = peak_growth_mib([small, big], tmp_path / "state")
    assert growth < 20, f"peak RSS grew by {growth:.1f} MiB while downloading 50 MiB"
    assert (tmp_path / "state" / "artifacts" / big.sha256).stat().st_size == 50 * MiB
    naive = peak_growth_mib([small, big], tmp_path / "state", naive=True)
    assert naive > 40, f"the probe cannot see a download held in memory (grew {naive:.1f} MiB)"
