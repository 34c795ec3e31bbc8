"""The artifact directory: each file once, named by its SHA-256, so nginx or a CDN can serve it as is.

An upload is written to a temporary file in the same directory while it is hashed, never held in
memory; once its record is stored it is renamed to <sha256> (atomic: a reader sees the whole file
or none). Bytes uploaded twice are kept once: the second copy's temporary file is removed. A file
is removed when no artifact record names its SHA-256 any more (store/artifacts.py decides when).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, BinaryIO, Callable, TypeVar

from .errors import ArtifactNotWritten, ArtifactTooLarge, ConfigError

TEMP_PREFIX = ".upload-"  # never a SHA-256, so never served
STALE_TEMP_SECONDS = 24 * 3600  # a temporary file this old was left by a crash: removed at start
WRITE_BYTES = 1 << 20  # bytes gathered before one write (and hash) on a worker thread
DIR_MODE, FILE_MODE = 0o755, 0o644  # readable by a web server that serves the directory
SHA256_RE = re.compile(r"[0-9a-f]{64}")
T = TypeVar("T")


@dataclass(frozen=True)
class Received:
    """An upload written to a temporary file, not yet kept."""

    temp: Path
    sha256: str
    size: int


class ArtifactFiles:
    def __init__(self, directory: Path, max_size: int) -> None:
        self.directory = directory
        self.max_size = max_size

    def prepare(self) -> None:
        """Make the directory; remove temporary files a crash left. Raises ConfigError naming the flag."""
        try:
            self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            for leftover in self.directory.glob(TEMP_PREFIX + "*"):
                with contextlib.suppress(OSError):
                    if time.time() - leftover.stat().st_mtime > STALE_TEMP_SECONDS:
                        leftover.unlink()
        except OSError as e:
            raise ConfigError(f"cannot use the artifact directory {self.directory} (--artifact-dir / "
                              f"OTA_BRIDGE_ARTIFACT_DIR): {e.strerror or e}") from e

    def path(self, sha256: str) -> Path:
        if not SHA256_RE.fullmatch(sha256):
            raise ValueError("not a SHA-256")
        return self.directory / sha256

    async def receive(self, chunks: AsyncIterator[bytes]) -> Received:
        """Write chunks to a temporary file, hashing them. ArtifactTooLarge past max_size,
        ArtifactNotWritten when the disk refuses; either way, or when the client goes, nothing is left."""
        temp = self.directory / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        digest, size, pending = hashlib.sha256(), 0, bytearray()
        out = await self._on_disk(_open_new, temp)
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_size:
                    raise ArtifactTooLarge(self.max_size)
                pending += chunk
                if len(pending) >= WRITE_BYTES:
                    await self._on_disk(_write, out, digest, bytes(pending))
                    pending.clear()
            await self._on_disk(_write, out, digest, bytes(pending))
            await self._on_disk(_finish, out)
        except BaseException:
            out.close()
            temp.unlink(missing_ok=True)
            raise
        return Received(temp, digest.hexdigest(), size)

    async def _on_disk(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on a worker thread; the disk's refusal (full, read-only) as ArtifactNotWritten."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except OSError as e:
            raise ArtifactNotWritten(str(self.directory), e.strerror or str(e)) from e

    def keep(self, received: Received) -> None:
        """Move an upload to its place; the same bytes already there stay, the copy goes."""
        target = self.path(received.sha256)
        if target.exists():
            received.temp.unlink(missing_ok=True)
        else:
            os.replace(received.temp, target)

    @staticmethod
    def discard(received: Received) -> None:
        received.temp.unlink(missing_ok=True)

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)


def _open_new(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    return os.fdopen(fd, "wb")


def _finish(out: BinaryIO) -> None:
    """On disk before its record is stored: a crash then leaves no record of bytes never written."""
    out.flush()
    os.fsync(out.fileno())
    out.close()


def _write(out: BinaryIO, digest: Any, data: bytes) -> None:
    out.write(data)
    digest.update(data)
