"""docs/protocol.md is the contract: its examples must be what the code makes and accepts.

The signed job head and idle head of section 4.1 must verify with the example key, over exactly
the bytes the page shows, and the service's head_message must make exactly those messages; the
RFC 8410 key prefix of section 2.1 must be what standard tools use.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import job_signature, protocol
from agent.head import parse_head
from agent.protocol import Key
from ota_bridge.device_messages import head_message
from ota_bridge.store.queues import QueueEntry

PAGE = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
SECTION_41 = PAGE[PAGE.index("### 4.1 Job head"):PAGE.index("### 4.2 Queue list")]


def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of text: (language, content)."""
    return re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)


def example_key() -> bytes:
    found = re.search(r"throwaway key whose public key is\s+`([A-Za-z0-9+/=]+)`", SECTION_41)
    assert found, "section 4.1 names the example's public key"
    return job_signature.parse_public_key(found.group(1))


JOB_JSON, JOB_BYTES, IDLE_JSON, IDLE_BYTES = (content for _, content in blocks(SECTION_41)[:4])


@pytest.mark.parametrize("example, signed, size_text", [
    (JOB_JSON, JOB_BYTES, "these 146 bytes"),
    (IDLE_JSON, IDLE_BYTES, "these 64\nbytes"),
], ids=["job head", "idle head"])
def test_the_signed_examples_verify_over_the_bytes_the_page_shows(example, signed, size_text):
    message = json.loads(example)
    content = job_signature.signed_content(message)
    assert content == signed.rstrip("\n").encode()
    assert size_text in SECTION_41 and f"{len(content)}" in size_text
    assert job_signature.signature_problem(message[Key.SIGNATURE], content, (example_key(),)) is None
    head = parse_head(protocol.encode(message), 60)
    assert head.is_idle == (Key.JOB_ID not in message) and head.signed_content == content


def test_the_service_makes_exactly_the_examples():
    job, idle = json.loads(JOB_JSON), json.loads(IDLE_JSON)
    entry = QueueEntry(job[Key.JOB_ID], job[Key.PARENT_JOB_ID], job[Key.JOB_NAME], job[Key.COMMAND],
                       job[Key.TIMEOUT_SECONDS], job[Key.SUCCESS_ON_RESTART], job[Key.SEQ], "QUEUED",
                       _naive(job[Key.SUBMITTED_TIME]))
    made = head_message(job[Key.DEVICE_ID], entry, job[Key.FLOOR], _naive(job[Key.ISSUED_AT]),
                        lambda _: job[Key.SIGNATURE])
    assert made == protocol.encode(job)
    made_idle = head_message(idle[Key.DEVICE_ID], None, idle[Key.FLOOR], _naive(idle[Key.ISSUED_AT]),
                             lambda _: idle[Key.SIGNATURE])
    assert made_idle == IDLE_JSON.strip().encode()


def _naive(text: str) -> datetime:
    return protocol.parse_time(text).replace(tzinfo=None)


def test_the_spki_prefix_and_pem_are_what_standard_tools_use():
    raw = example_key()
    spki = Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert spki == protocol.ED25519_SPKI_PREFIX + raw
    assert "`302a300506032b6570032100`" in PAGE and protocol.ED25519_SPKI_PREFIX.hex() == "302a300506032b6570032100"
    octal = re.search(r"printf '((?:\\\d{3})+)'", PAGE).group(1)
    assert bytes(int(o, 8) for o in octal.split("\\")[1:]) == protocol.ED25519_SPKI_PREFIX
    assert f"is in PEM `{base64.b64encode(spki).decode()}`" in PAGE


def test_the_page_is_the_contract_and_states_the_window():
    assert "the code wins" not in PAGE
    assert protocol.HEAD_VALIDITY_SECONDS == 24 * 3600 and "24 hours (`HEAD_VALIDITY_SECONDS`)" in PAGE
    assert f"`{protocol.JOB_ID_PATTERN}` (`JOB_ID_PATTERN`" in PAGE
    assert f"`{protocol.SIGNATURE_DOMAIN}`" in PAGE and f"{protocol.IDLE_SIGNATURE_DOMAIN}\n" in PAGE
