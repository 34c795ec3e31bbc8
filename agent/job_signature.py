"""Whether a head was signed by the ota-bridge service: the keys the agent trusts, and the check.

The service signs protocol.signing_bytes(head) with Ed25519 and puts the signature, base64, in
the head's "Signature". Its public key (raw 32 bytes, base64) is `<data-dir>/job-signing.pub`
on the service and GET /v1/signing-key; the agent is given it with --server-key-file or
--server-key. During a key rotation the agent trusts two keys (one per line of the key file);
a head signed by any of them verifies. Standard library only, like the rest of the agent.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any, Callable

from . import ed25519, protocol
from .protocol import Key

NOT_SIGNED = "the job is not signed"
DOES_NOT_VERIFY = "the job's signature does not verify with any key this device trusts"
WHERE_TO_GET_THE_KEY = ("copy the service's <data-dir>/job-signing.pub to the device, "
                        "or take PublicKey from the service's GET /v1/signing-key")

log = logging.getLogger("ota-agent")
Verify = Callable[[bytes, bytes, bytes], bool]
_VERIFIER: list[Verify] = []  # chosen at the first head: OpenSSL's when it loads, else ed25519.verify


def parse_public_key(text: str) -> bytes:
    """The raw 32-byte public key from its base64 text (surrounding whitespace allowed).

    Raises ValueError saying what is wrong with it.
    """
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"is not base64 ({e})") from e
    if len(raw) != ed25519.PUBLIC_KEY_BYTES:
        raise ValueError(f"is {len(raw)} bytes; an {protocol.SIGNATURE_ALGORITHM} public key is "
                         f"{ed25519.PUBLIC_KEY_BYTES}")
    if ed25519.decode_point(raw) is None:
        raise ValueError(f"is not an {protocol.SIGNATURE_ALGORITHM} public key (no such curve point)")
    return raw


def parse_public_keys(text: str) -> tuple[bytes, ...]:
    """The raw public keys of a key file: one base64 key a line; blank lines and '#' comments
    are skipped. Raises ValueError naming the bad line, or saying there is no key."""
    keys: list[bytes] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            keys.append(parse_public_key(line))
        except ValueError as e:
            raise ValueError(f"the key on line {number} {e}") from e
    if not keys:
        raise ValueError("there is no key in it")
    return tuple(dict.fromkeys(keys))


_JOB_FIELDS = ((Key.DEVICE_ID, str), (Key.JOB_ID, str), (Key.SEQ, int), (Key.FLOOR, int), (Key.ISSUED_AT, str),
               (Key.TIMEOUT_SECONDS, int), (Key.SUCCESS_ON_RESTART, bool), (Key.COMMAND, str))
_IDLE_FIELDS = ((Key.DEVICE_ID, str), (Key.FLOOR, int), (Key.ISSUED_AT, str))


def signed_content(message: dict[str, Any]) -> bytes | None:
    """The bytes the service signed for this head; None when the head's signed fields are not
    exactly what the service sends (so what the agent reads is always what was signed: no "5"
    or 5.0 for a Seq of 5, no 1 for true)."""
    exact_types = _IDLE_FIELDS if protocol.is_idle_head(message) else _JOB_FIELDS
    for key, kind in exact_types:
        value = message.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return None
    try:
        return protocol.signing_bytes(message)
    except (KeyError, TypeError, ValueError, UnicodeEncodeError):
        return None


def signature_problem(signature: Any, content: bytes | None, public_keys: tuple[bytes, ...]) -> str | None:
    """None when `signature` (the head's base64 "Signature") signs `content` with one of the
    keys; else the reason."""
    if signature is None:
        return NOT_SIGNED
    if not isinstance(signature, str) or content is None:
        return DOES_NOT_VERIFY
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return DOES_NOT_VERIFY
    verify = verifier()
    if any(verify(key, content, raw) for key in public_keys):
        return None
    return DOES_NOT_VERIFY


def verifier() -> Verify:
    """The Ed25519 verifier: the system's OpenSSL (agent/ed25519_openssl.py) when it loads, else the
    pure-Python one; both give the same answers. Chosen, and logged, at the first head with a
    signature: an agent with no head yet imports no ctypes (~0.57 MiB). For the first head,
    idle or not, loading OpenSSL costs less RSS (~0.55 MiB) than the pure-Python verifier's
    tables (~0.66 MiB; bench/RESULTS.md, 2026-11-30 fastverify)."""
    if not _VERIFIER:
        from . import ed25519_openssl  # noqa: PLC0415 - lazily, see the docstring

        fast, where = ed25519_openssl.load()
        if fast is not None:
            log.info("verifies job signatures with the system's OpenSSL (%s)", where)
            _VERIFIER.append(fast.verify)
        else:
            log.info("verifies job signatures in pure Python: %s", where)
            _VERIFIER.append(ed25519.verify)
    return _VERIFIER[0]
