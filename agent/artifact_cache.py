"""A job's artifacts on the device: the cache of checked files by SHA-256, the partial downloads
beside them, and the per-job directory a command reads them from.

    <state-dir>/<device-id>/artifacts/<sha256>        complete and checked; read-only (mode 0444)
    <state-dir>/<device-id>/artifacts/<sha256>.part   a download in progress, resumed after a restart
    <state-dir>/<device-id>/jobs/<JobId>/<Name>       the job's artifacts: hard links into the cache
                                                      (copies where a link cannot be made)

A file is "used" when a job gets it (its mtime is set then). The cache keeps at most `max_bytes`
of complete and partial files: `evict` removes the least recently used until the rest fit,
never one the current job needs (`keep`). A cached file is hashed again before a job gets it,
so a file changed on disk (the command's own hard link, a bad sector) is fetched again rather
than used. Standard library only, like the rest of the agent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from .protocol import ArtifactKey

log = logging.getLogger("ota-agent")

CACHE_DIR = "artifacts"
JOBS_DIR = "jobs"
PART_SUFFIX = ".part"
HASH_CHUNK = 1024 * 1024


class Artifact(NamedTuple):
    """One entry of a head's signed Artifacts list (an immutable record, like agent/head.py's Head)."""

    sha256: str  # 64 lowercase hex digits
    size: int  # bytes
    name: str  # the file's name in the job's directory (protocol.ARTIFACT_NAME_PATTERN)
    url: str  # http(s)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Artifact:
        """From an entry whose shape protocol.signing_bytes has already checked."""
        return cls(raw[ArtifactKey.SHA256], raw[ArtifactKey.SIZE], raw[ArtifactKey.NAME], raw[ArtifactKey.URL])


def file_sha256(path: Path, hasher: Any = None) -> Any:
    """Feed the file to `hasher` (a new SHA-256 when None), a chunk at a time; return the hasher."""
    hasher = hasher if hasher is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            hasher.update(chunk)
    return hasher


class ArtifactCache:
    """The artifacts directory and the jobs directory of one device's state directory."""

    def __init__(self, device_state_dir: Path, max_bytes: int) -> None:
        self.root = Path(device_state_dir) / CACHE_DIR
        self.jobs_root = Path(device_state_dir) / JOBS_DIR
        self.max_bytes = max_bytes

    def open(self) -> None:
        """Create both directories (mode 0700); remove the job directories a dead agent left."""
        for directory in (self.root, self.jobs_root):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self.jobs_root.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    def complete_path(self, sha256: str) -> Path:
        return self.root / sha256

    def part_path(self, sha256: str) -> Path:
        return self.root / (sha256 + PART_SUFFIX)

    def has(self, artifact: Artifact) -> bool:
        """Whether the cache holds this artifact, checked again by size and SHA-256; a cached
        file that fails is removed (and fetched again)."""
        path = self.complete_path(artifact.sha256)
        try:
            if path.stat().st_size == artifact.size and file_sha256(path).hexdigest() == artifact.sha256:
                return True
        except FileNotFoundError:
            return False
        log.warning("artifact %s: the cached file %s no longer matches its SHA-256; fetching it again",
                    artifact.name, path)
        path.unlink(missing_ok=True)
        return False

    def part_size(self, sha256: str) -> int:
        try:
            return self.part_path(sha256).stat().st_size
        except FileNotFoundError:
            return 0

    def store(self, sha256: str) -> Path:
        """Make a checked partial file the cached file (read-only from now on)."""
        part, path = self.part_path(sha256), self.complete_path(sha256)
        os.chmod(part, 0o444)
        os.replace(part, path)
        return path

    def link_job(self, job_id: str, artifacts: Iterable[Artifact]) -> tuple[Path, list[Path]]:
        """The job's directory holding each artifact under its Name, and their paths. Raises OSError."""
        job_dir = self.jobs_root / job_id
        shutil.rmtree(job_dir, ignore_errors=True)
        job_dir.mkdir(mode=0o700)
        paths = []
        for artifact in artifacts:
            source, target = self.complete_path(artifact.sha256), job_dir / artifact.name
            os.utime(source)  # used now: the last to be evicted
            try:
                os.link(source, target)
            except OSError:  # e.g. a file system without hard links
                shutil.copyfile(source, target)
                os.chmod(target, 0o444)
            paths.append(target)
        return job_dir, paths

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self.jobs_root / job_id, ignore_errors=True)

    def evict(self, keep: Iterable[str] = ()) -> list[str]:
        """Remove the least recently used files until the cache holds at most max_bytes; never
        the files (complete or partial) of the SHA-256 values in `keep`. Returns the names removed."""
        kept = set(keep)
        files = sorted(self._files(), key=lambda entry: entry[1].st_mtime_ns)
        total = sum(info.st_size for _, info in files)
        removed = []
        for path, info in files:
            if total <= self.max_bytes:
                break
            if path.name.removesuffix(PART_SUFFIX) in kept:
                continue
            path.unlink(missing_ok=True)
            total -= info.st_size
            removed.append(path.name)
        if removed:
            log.info("artifact cache: removed %d least recently used file(s) to stay within %d bytes; %d bytes "
                     "left", len(removed), self.max_bytes, total)
        return removed

    def _files(self) -> list[tuple[Path, os.stat_result]]:
        try:
            return [(Path(entry.path), entry.stat()) for entry in os.scandir(self.root) if entry.is_file()]
        except FileNotFoundError:
            return []
