"""The service's Ed25519 key pair: every job head it publishes is signed with it.

Made on the first start in the data directory: `job-signing.key` (private, mode 0600, PEM) and
`job-signing.pub` (the raw public key, base64, one line), which is what agents are given with
--server-key-file. A compromised broker cannot make an agent run anything without this key.
"""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .files import write_atomically

PRIVATE_KEY_FILE = "job-signing.key"
PUBLIC_KEY_FILE = "job-signing.pub"


class JobSigner:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key_b64 = base64.b64encode(raw).decode("ascii")

    def sign(self, data: bytes) -> str:
        """The signature of data, base64."""
        return base64.b64encode(self._key.sign(data)).decode("ascii")


def load_or_create(data_dir: Path) -> JobSigner:
    """The data dir's key pair, made (private key mode 0600) if there is none yet."""
    private = data_dir / PRIVATE_KEY_FILE
    if private.exists():
        key = serialization.load_pem_private_key(private.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{private} is not an Ed25519 private key")
    else:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        write_atomically(private, pem, 0o600)
    signer = JobSigner(key)
    write_atomically(data_dir / PUBLIC_KEY_FILE, (signer.public_key_b64 + "\n").encode(), 0o644)
    return signer
