"""Writing the service's own files: atomically, with their mode from the first byte."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int, *, keep_attributes: bool = False) -> None:
    """Write path so that readers see the old file or the new one, never half of it.

    The temporary file has a name of its own (parallel writers never share one) and is private
    until given `mode`, so a secret is never readable by others, even briefly. With
    keep_attributes, a file that exists keeps its owner, group and mode (`mode` is then for a new
    file only): a file an operator gave to another program's group stays readable by it.
    Raises OSError, the old file untouched, if the new one cannot be written or given those.
    """
    old = _stat(path) if keep_attributes else None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if old is not None:
                _same_owner(f.fileno(), old, path)
            os.fchmod(f.fileno(), mode if old is None else stat.S_IMODE(old.st_mode))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _same_owner(fd: int, old: os.stat_result, path: Path) -> None:
    new = os.fstat(fd)
    if (new.st_uid, new.st_gid) == (old.st_uid, old.st_gid):
        return
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError as e:
        raise PermissionError(e.errno, f"cannot give the new {path} the owner and group of the old one "
                                       f"(uid {old.st_uid}, gid {old.st_gid}); make the service's user "
                                       f"its owner and the directory setgid (docs/security.md)") from e
