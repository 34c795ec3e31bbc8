"""The service's Ed25519 key pairs: every head it publishes is signed with the active one.

In the data directory: `job-signing.key` (the active private key, mode 0600, PEM) and
`job-signing.pub` (its raw public key, base64, one line), which is what agents are given with
--server-key-file. A compromised broker cannot make an agent run anything without this key.

The active key is made on the first start only: when it is missing but the database already has
devices or jobs, the service refuses to start (every agent trusts the old key, so a new one would
make every queued job REJECTED) unless told to with --new-signing-key.

Rotation (docs/security.md) stages a next key (`job-signing.next.key`/`.pub`), which agents are
given beside the old one; activating it makes it the active key and keeps the old one as
`job-signing.previous.key`/`.pub` until it is retired.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import ConfigError
from .files import write_atomically

PRIVATE_KEY_FILE = "job-signing.key"
PUBLIC_KEY_FILE = "job-signing.pub"
ACTIVE, NEXT, PREVIOUS = "", ".next", ".previous"  # the key pairs' file name infixes


class JobSigner:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key_b64 = base64.b64encode(raw).decode("ascii")

    def sign(self, data: bytes) -> str:
        """The signature of data, base64."""
        return base64.b64encode(self._key.sign(data)).decode("ascii")

    def derived_key(self, label: str) -> bytes:
        """A secret for another use, SHA-256(label + the raw 32-byte private key): every instance that
        holds the signing key derives the same one, and it tells nothing of the key."""
        raw = self._key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption())
        return hashlib.sha256(label.encode() + raw).digest()


def key_files(data_dir: Path, which: str = ACTIVE) -> tuple[Path, Path]:
    """(private, public) key files of the active, next or previous key pair."""
    return data_dir / f"job-signing{which}.key", data_dir / f"job-signing{which}.pub"


def load_or_create(data_dir: Path, may_create: bool = True) -> JobSigner:
    """The data dir's active key pair; made (private key mode 0600) if there is none and may_create.

    Raises ConfigError when the key is missing and may not be made, or is not an Ed25519 key.
    """
    private, public = key_files(data_dir)
    if private.exists():
        signer = JobSigner(_load(private))
    elif may_create:
        signer = _create(private)
    else:
        raise ConfigError(
            f"the job-signing key {private} is missing, but the database already has devices or jobs: every "
            f"agent trusts the old key and would reject all their jobs; restore {private.name} from a backup, "
            "or start once with --new-signing-key (OTA_BRIDGE_NEW_SIGNING_KEY=true) to make a new one and give "
            f"every agent the new {public.name}")
    write_atomically(public, (signer.public_key_b64 + "\n").encode(), 0o644)
    return signer


def public_key(data_dir: Path, which: str = ACTIVE) -> str | None:
    """The base64 public key of a key pair; None when there is no such key."""
    private = key_files(data_dir, which)[0]
    return JobSigner(_load(private)).public_key_b64 if private.exists() else None


def stage_next(data_dir: Path) -> str:
    """Make the next key pair (not used for signing yet); returns its public key."""
    if public_key(data_dir) is None:
        raise ConfigError(f"there is no active job-signing key in {data_dir} to rotate from")
    private, public = key_files(data_dir, NEXT)
    if private.exists():
        raise ConfigError(f"a next key is already staged ({private}); activate it with "
                          "`ota-bridge signing-key rotate --activate`, or delete it to stage another")
    signer = _create(private)
    write_atomically(public, (signer.public_key_b64 + "\n").encode(), 0o644)
    return signer.public_key_b64


def activate_next(data_dir: Path) -> str:
    """Make the staged next key the active one; the active one becomes the previous. Returns the new key."""
    staged = key_files(data_dir, NEXT)
    if not staged[0].exists():
        raise ConfigError(f"no next key is staged in {data_dir}: run `ota-bridge signing-key rotate` first")
    previous = key_files(data_dir, PREVIOUS)
    if previous[0].exists():
        raise ConfigError(f"a previous key is still kept ({previous[0]}); retire it first with "
                          "`ota-bridge signing-key retire`")
    for current, kept in zip(key_files(data_dir), previous, strict=True):
        os.replace(current, kept)
    for new, current in zip(staged, key_files(data_dir), strict=True):
        os.replace(new, current)
    return JobSigner(_load(key_files(data_dir)[0])).public_key_b64


def retire_previous(data_dir: Path) -> str | None:
    """Delete the previous key pair; returns its public key (None: there was none)."""
    retired = public_key(data_dir, PREVIOUS)
    for path in key_files(data_dir, PREVIOUS):
        path.unlink(missing_ok=True)
    return retired


def _load(private: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{private} is not an Ed25519 private key")
    return key


def _create(private: Path) -> JobSigner:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_atomically(private, pem, 0o600)
    return JobSigner(key)
