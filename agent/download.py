"""Fetch a job's artifacts before its command runs, and check each against its signed size and SHA-256.

A JobDownload runs on a worker thread of its own (the MQTT link and the agent's main loop go on);
`cancel()` may be called from any thread. For each artifact of the job that the cache does not
already hold (artifact_cache.py), it:

- checks first that the disk has room for the bytes still to fetch, else fails with
  "not enough disk space: need X bytes, have Y" without a request;
- streams the body to `<sha256>.part` in the cache directory, a chunk at a time (memory stays
  flat whatever the size), hashing as it writes;
- after a cut (network error, stalled read, 5xx, a body that ends early) retries with a wait
  doubling from RetryPolicy.first_delay to max_delay, asking `Range: bytes=<size of the part>-`
  once the part holds bytes (the part is hashed first): a 206 answer is appended, a 200 starts
  over. An agent restarted in the middle resumes the same way, from the part on disk;
- gives up (FAILED) after RetryPolicy.attempts failures in a row that brought no new byte, and
  at once on a refusal (HTTP 4xx other than 408 and 429: e.g. 403, 404);
- on a size or checksum mismatch deletes the part and fails, saying what was expected and what
  came; only a file that matches becomes the cached file.

http:// and https:// (urllib: the system's CAs plus the agent's --ca-file; the host name must
match the certificate). urllib follows redirects and the usual http_proxy/https_proxy variables.
Standard library only, like the rest of the agent.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import logging
import shutil
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

from . import protocol
from .artifact_cache import Artifact, ArtifactCache, file_sha256
from .protocol import JobStatus, Key, ProgressKey
from .untrusted import shown

log = logging.getLogger("ota-agent")

CHUNK_BYTES = 64 * 1024
READ_TIMEOUT_SECONDS = 30.0  # a connection, or a read, that waits this long counts as a cut
PROGRESS_INTERVAL_SECONDS = 1.0
_RETRIABLE_CLIENT_ERRORS = frozenset({408, 429})  # timeouts and throttling: try again later
# The command's environment, for a job with artifacts (OTA_ARTIFACT_<i>_PATH, _NAME, _SHA256 per artifact).
ENV_ARTIFACT_DIR = "OTA_ARTIFACT_DIR"
ENV_ARTIFACT_COUNT = "OTA_ARTIFACT_COUNT"
ENV_ARTIFACT_PREFIX = "OTA_ARTIFACT_"


class RetryPolicy(NamedTuple):
    """How long to wait between tries, and when to give up."""

    first_delay: float = 1.0  # seconds before the first retry; doubles with each failure in a row
    max_delay: float = 60.0
    attempts: int = 10  # failures in a row without one new byte before the download is FAILED (~4 min of waits)

    def delay(self, failures: int) -> float:
        return min(self.first_delay * 2 ** max(0, failures - 1), self.max_delay)


DEFAULT_RETRY = RetryPolicy()


class DownloadError(Exception):
    """The job's artifacts cannot be had: the job is FAILED with this reason."""


class DownloadCanceled(Exception):
    """cancel() was called: the job's head moved on, or the agent is stopping."""


class _Cut(Exception):
    """One try ended before the file was whole; another try may finish it."""

    def __init__(self, reason: str, progressed: bool) -> None:
        super().__init__(reason)
        self.progressed = progressed


class Progress(NamedTuple):
    done: int  # bytes of the job's artifacts on disk (cached, or fetched so far)
    total: int  # bytes of all the job's artifacts


def duplicate_name(artifacts: Iterable[Artifact]) -> str | None:
    """A Name two artifacts share (they would be one file in the job's directory); None if none."""
    seen: set[str] = set()
    for artifact in artifacts:
        if artifact.name in seen:
            return artifact.name
        seen.add(artifact.name)
    return None


class JobDownload:
    """Fetches one job's artifacts into the cache. `run()` blocks; `cancel()` from any thread."""

    def __init__(self, job_id: str, artifacts: Iterable[Artifact], cache: ArtifactCache, *,
                 on_progress: Callable[[Progress], None] = lambda progress: None, ca_file: Path | None = None,
                 retry: RetryPolicy = DEFAULT_RETRY, read_timeout: float = READ_TIMEOUT_SECONDS) -> None:
        self.job_id = job_id
        self.artifacts = tuple(artifacts)
        self.cache = cache
        self.on_progress = on_progress
        self.ca_file = ca_file
        self.retry = retry
        self.read_timeout = read_timeout
        self.start_time: datetime = protocol.utc_now()
        self.cancel_reason: str | None = None
        self._canceled = threading.Event()
        self._total = sum(a.size for a in _distinct(self.artifacts))
        self._finished = 0  # bytes of the artifacts cached (before or by this download)
        self._current = 0  # bytes of the artifact being fetched that are in its part file
        self._reported_at: float | None = None
        self._response: Any = None  # the response being read, for cancel() to interrupt
        self._response_lock = threading.Lock()

    def cancel(self, reason: str) -> None:
        """Stop now: a read waiting on a quiet link is woken, a retry wait ends; run() then raises
        DownloadCanceled."""
        self.cancel_reason = reason
        self._canceled.set()
        with self._response_lock:
            _interrupt(self._response)

    def run(self) -> None:
        """Fetch and check every artifact the cache lacks. Raises DownloadError or DownloadCanceled."""
        if (name := duplicate_name(self.artifacts)) is not None:
            raise DownloadError(f"two artifacts are named {name}: they cannot both be in the job's directory")
        needed = [a for a in _distinct(self.artifacts) if not self.cache.has(a)]
        self.cache.evict(keep=(a.sha256 for a in self.artifacts))  # room for this job, from older ones
        self._check_space(needed)
        self._finished = self._total - sum(a.size for a in needed)
        if not needed:
            self._report(force=True)  # the first report of a download comes once its resume point is known
        for artifact in needed:
            self._fetch(artifact)
        self._report(force=True)

    def _part_size(self, artifact: Artifact) -> int:
        size = self.cache.part_size(artifact.sha256)
        return size if size <= artifact.size else 0

    def _check_space(self, needed: list[Artifact]) -> None:
        need = sum(a.size - self._part_size(a) for a in needed)
        have = shutil.disk_usage(self.cache.root).free
        if need > have:
            raise DownloadError(f"not enough disk space: need {need} bytes, have {have} bytes free in "
                                f"{self.cache.root}")

    def _check_canceled(self) -> None:
        if self._canceled.is_set():
            raise DownloadCanceled(self.cancel_reason or "canceled")

    def _report(self, force: bool = False) -> None:
        """Hand the progress on: at most every PROGRESS_INTERVAL_SECONDS, unless `force`."""
        now = time.monotonic()
        if force or self._reported_at is None or now - self._reported_at >= PROGRESS_INTERVAL_SECONDS:
            self._reported_at = now
            self.on_progress(Progress(self._finished + self._current, self._total))

    # --- one artifact -----------------------------------------------------------------------

    def _fetch(self, artifact: Artifact) -> None:
        """Try until the artifact is cached, the retries run out, or the download is canceled."""
        failures = 0
        while True:
            self._check_canceled()
            try:
                self._try(artifact)
                return
            except _Cut as cut:
                failures = 0 if cut.progressed else failures + 1
                if failures >= self.retry.attempts:
                    raise DownloadError(f"artifact {artifact.name}: gave up after {failures} tries in a row "
                                        f"without progress; the last: {cut}") from None
                wait = self.retry.delay(failures)
                self._report(force=True)  # how far it got before the cut, for the wait that follows
                log.warning("job %s: artifact %s: %s; retrying in %g s from byte %d", self.job_id, artifact.name,
                            cut, wait, self.cache.part_size(artifact.sha256))
            if self._canceled.wait(wait):
                self._check_canceled()

    def _try(self, artifact: Artifact) -> None:
        """One request: resume (or start) the part file, then check and cache it. Raises _Cut.

        A file that fails its checksum after a resume is fetched once more whole before the job
        fails: the part on disk may be what was wrong (a power cut can leave garbage at its end).
        """
        hasher, offset = self._resume_point(artifact)
        kept = offset  # bytes of the file that were on disk before this request
        self._report()
        if offset < artifact.size:
            if offset:
                log.info("job %s: artifact %s: resuming at byte %d of %d (Range: bytes=%d-)", self.job_id,
                         artifact.name, offset, artifact.size, offset)
            hasher, offset, kept = self._receive(artifact, hasher, offset)
        if kept and hasher.hexdigest() != artifact.sha256:
            self.cache.part_path(artifact.sha256).unlink(missing_ok=True)
            raise _Cut(f"the file resumed at byte {kept} fails its checksum; fetching it whole", False)
        self._check_digest(artifact, hasher)
        self.cache.store(artifact.sha256)
        self._finished, self._current = self._finished + artifact.size, 0

    def _resume_point(self, artifact: Artifact) -> tuple[Any, int]:
        """The hash of the part file so far and its size; a part longer than the artifact is dropped."""
        part = self.cache.part_path(artifact.sha256)
        size = self.cache.part_size(artifact.sha256)
        if size > artifact.size:
            part.unlink()
            size = 0
        self._current = size
        return (file_sha256(part) if size else hashlib.sha256()), size

    def _receive(self, artifact: Artifact, hasher: Any, offset: int) -> tuple[Any, int, int]:
        """Request the bytes from `offset` on and append them to the part file: the hasher, the new
        offset and where this response's bytes began (0 when the server sent the whole file).
        Raises _Cut when they end before the artifact's size."""
        start = offset
        response = self._open(artifact, offset)
        with self._response_lock:
            self._response = response
        try:
            self._check_canceled()  # canceled while the request was on its way
            if offset and response.status == 200:  # the server ignored the Range: start over
                log.info("job %s: artifact %s: the server sent the whole file (200), not the rest from byte "
                         "%d; starting over", self.job_id, artifact.name, offset)
                hasher, offset, start, self._current = hashlib.sha256(), 0, 0, 0
            self._check_length(artifact, response, offset)
            offset = self._stream(artifact, response, hasher, offset, start)
        finally:
            with self._response_lock:  # cancel() never touches a connection once it is closed
                self._response = None
            response.close()
        if offset < artifact.size:
            raise _Cut(f"the body ended at byte {offset} of {artifact.size}", offset > start)
        return hasher, offset, start

    def _stream(self, artifact: Artifact, response: Any, hasher: Any, offset: int, start: int) -> int:
        """Copy the body to the part file a chunk at a time; the new offset."""
        buffer = bytearray(CHUNK_BYTES)
        view = memoryview(buffer)
        with open(self.cache.part_path(artifact.sha256), "ab" if offset else "wb") as part:
            while True:
                self._check_canceled()
                try:
                    count = response.readinto(view)
                except (OSError, ValueError, http.client.HTTPException) as e:
                    raise _Cut(f"the connection broke at byte {offset}: {_describe(e)}", offset > start) from e
                if not count:
                    return offset
                if offset + count > artifact.size:
                    part.close()
                    self._mismatch(artifact, f"size mismatch: expected {artifact.size} bytes, got more")
                part.write(view[:count])
                hasher.update(view[:count])
                offset += count
                self._current = offset
                self._report()

    def _open(self, artifact: Artifact, offset: int) -> Any:
        """The response to GET Url (with a Range from `offset`); raises _Cut or DownloadError."""
        headers = {"User-Agent": "ota-agent", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(artifact.url, headers=headers)
        context = https_context(self.ca_file) if artifact.url.startswith("https:") else None
        try:
            return urllib.request.urlopen(request, timeout=self.read_timeout, context=context)
        except urllib.error.HTTPError as e:
            e.close()
            self._refused(artifact, e.code, e.reason)
            raise _Cut(f"the server answered HTTP {e.code} {shown(e.reason)}", False) from e
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
            raise _Cut(f"the request failed: {_describe(e)}", False) from e

    def _refused(self, artifact: Artifact, code: int, reason: Any) -> None:
        """A refusal no retry changes: fail now. 416: the part is no prefix of the file: start over."""
        if code == 416:
            self.cache.part_path(artifact.sha256).unlink(missing_ok=True)
        elif 400 <= code < 500 and code not in _RETRIABLE_CLIENT_ERRORS:
            raise DownloadError(f"artifact {artifact.name}: the server refused the download: HTTP {code} "
                                f"{shown(reason)} ({_without_query(artifact.url)})")

    def _check_length(self, artifact: Artifact, response: Any, offset: int) -> None:
        """The size the server says the file has must be the signed size."""
        if response.status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != offset:
                raise _Cut(f"the server's Content-Range {shown(response.headers.get('Content-Range'))} does not "
                           f"start at byte {offset}", False)
        elif response.status == 200:
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None and length.isdigit() else None
        else:
            raise _Cut(f"the server answered HTTP {response.status}", False)
        if total is not None and total != artifact.size:
            self._mismatch(artifact, f"size mismatch: expected {artifact.size} bytes, the server has {total}")

    def _check_digest(self, artifact: Artifact, hasher: Any) -> None:
        got = hasher.hexdigest()
        if got != artifact.sha256:
            self._mismatch(artifact, f"checksum mismatch: expected SHA-256 {artifact.sha256}, got {got}")

    def _mismatch(self, artifact: Artifact, problem: str) -> None:
        self.cache.part_path(artifact.sha256).unlink(missing_ok=True)
        raise DownloadError(f"artifact {artifact.name}: {problem}; the file was deleted")


def progress_message(job_id: str, progress: Progress, attempt: int = 1) -> dict[str, Any]:
    """A DOWNLOADING report for the status topic; it names the head's Attempt from attempt 2 on
    (a head without one is attempt 1)."""
    counts = {ProgressKey.BYTES: progress.done, ProgressKey.TOTAL_BYTES: progress.total}
    message: dict[str, Any] = {Key.JOB_ID: job_id, Key.STATUS: JobStatus.DOWNLOADING.value, Key.PROGRESS: counts}
    if attempt > 1:
        message[Key.ATTEMPT] = attempt
    return message


def artifact_environment(job_dir: Path, paths: list[Path], artifacts: Iterable[Artifact]) -> dict[str, str]:
    """What the command is told about its artifacts (docs/artifacts.md): the directory, the count, and
    per artifact (numbered from 1, in the head's order) its path, name and SHA-256."""
    env = {ENV_ARTIFACT_DIR: str(job_dir)}
    artifacts = tuple(artifacts)
    for number, (path, artifact) in enumerate(zip(paths, artifacts, strict=True), 1):
        env[f"{ENV_ARTIFACT_PREFIX}{number}_PATH"] = str(path)
        env[f"{ENV_ARTIFACT_PREFIX}{number}_NAME"] = artifact.name
        env[f"{ENV_ARTIFACT_PREFIX}{number}_SHA256"] = artifact.sha256
    env[ENV_ARTIFACT_COUNT] = str(len(artifacts))
    return env


def _without_query(url: str) -> str:
    """The URL without its query, for a Reason: the service's links carry their token there."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _interrupt(response: Any) -> None:
    """Shut the response's connection down from another thread: a read blocked on it returns at once.
    Through a duplicate of its descriptor: shutdown acts on the connection, and the reader closes its
    own. The caller holds the lock under which the reader drops the response before closing it."""
    try:
        sock = socket.fromfd(response.fileno(), socket.AF_INET, socket.SOCK_STREAM)
    except (AttributeError, OSError, ValueError):  # no response, or already closed
        return
    with sock, contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _distinct(artifacts: Iterable[Artifact]) -> list[Artifact]:
    """One artifact per SHA-256: the same bytes under two names are fetched once."""
    return list({a.sha256: a for a in artifacts}.values())


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """The first byte and the complete length of `Content-Range: bytes FIRST-LAST/LENGTH` (None: not said)."""
    unit, _, rest = (value or "").partition(" ")
    first, length = rest.partition("-")[0], rest.rpartition("/")[2]
    if unit != "bytes" or not first.isdigit():
        return None, None
    return int(first), int(length) if length.isdigit() else None


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {shown(str(error), cap=200)}"


@functools.lru_cache(maxsize=4)
def https_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system's CAs plus --ca-file's; TLS 1.2 or later, host names checked."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
