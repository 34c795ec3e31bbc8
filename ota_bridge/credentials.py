"""Secrets: API tokens and device MQTT passwords, made random and stored only as hashes.

Device password hashes use Mosquitto's own format (PBKDF2-SHA512, "$7$"), so the same column can
feed a Mosquitto password file. Every secret ota-bridge makes is 256 random bits, so a fast hash
is enough: nobody can guess such a secret, and the hash only protects a stolen database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

PBKDF2_ITERATIONS = 1000
_SALT_BYTES = 12


def new_secret() -> str:
    """A new random secret, URL-safe, 43 characters, never starting with "-": pasted after a flag
    (`--token SECRET`, `-P SECRET`), such a secret would be read as an option."""
    while True:
        secret = secrets.token_urlsafe(32)
        if not secret.startswith("-"):
            return secret


def token_hash(token: str) -> str:
    """The stored form of an API token: SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A Mosquitto-compatible PBKDF2-SHA512 hash: $7$ITERATIONS$SALT$HASH (base64)."""
    salt = salt or secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Check password against a hash made by hash_password, in constant time."""
    try:
        _, kind, iterations, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), base64.b64decode(salt), int(iterations))
    except (ValueError, TypeError):
        return False
    return kind == "7" and hmac.compare_digest(expected, actual)
