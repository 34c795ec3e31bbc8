"""The signed forms of a head: v2 stays byte for byte; an Attempt or Artifacts make it v3."""

from __future__ import annotations

from typing import Any

import pytest

from agent.protocol import SIGNATURE_DOMAIN, SIGNATURE_DOMAIN_V3, ArtifactKey, Key, signing_bytes

SHA = "0123456789abcdef" * 4


def head(**extra: Any) -> dict[str, Any]:
    return {Key.DEVICE_ID: "dev-1", Key.JOB_ID: "job-1", Key.SEQ: 7, Key.FLOOR: 6,
            Key.ISSUED_AT: "2026-11-30T06:00:00.000Z",
            Key.TIMEOUT_SECONDS: 60, Key.SUCCESS_ON_RESTART: False, Key.COMMAND: "echo hi\nexit 0", **extra}


def artifact(**change: Any) -> dict[str, Any]:
    return {ArtifactKey.SHA256: SHA, ArtifactKey.SIZE: 10, ArtifactKey.NAME: "fw.bin",
            ArtifactKey.URL: "https://ota.example/v1/device-artifact/x?token=t", **change}


def test_a_plain_head_signs_the_v2_form() -> None:
    assert signing_bytes(head()) == (f"{SIGNATURE_DOMAIN}\ndev-1\njob-1\n7\n6\n2026-11-30T06:00:00.000Z\n60\n0\n"
                                     "echo hi\nexit 0").encode()


def test_an_attempt_or_artifacts_sign_the_v3_form() -> None:
    v2_lines = "dev-1\njob-1\n7\n6\n2026-11-30T06:00:00.000Z\n60\n0\n"
    assert signing_bytes(head(**{Key.ATTEMPT: 3})) == f"{SIGNATURE_DOMAIN_V3}\n{v2_lines}3\n0\necho hi\nexit 0".encode()
    assert signing_bytes(head(**{Key.ARTIFACTS: [artifact()]})) == (
        f"{SIGNATURE_DOMAIN_V3}\n{v2_lines}1\n1\n{SHA} 10 fw.bin https://ota.example/v1/device-artifact/x?token=t\n"
        "echo hi\nexit 0").encode()


def test_a_command_cannot_pass_for_an_artifact_line() -> None:
    forged = head(**{Key.COMMAND: f"{SHA} 10 fw.bin https://x/y\necho hi\nexit 0"})
    assert signing_bytes(forged) != signing_bytes(head(**{Key.ARTIFACTS: [artifact(**{ArtifactKey.URL: "https://x/y"})]}))


@pytest.mark.parametrize("change", [
    {ArtifactKey.SHA256: SHA.upper()}, {ArtifactKey.SHA256: SHA[:-1]}, {ArtifactKey.SIZE: -1},
    {ArtifactKey.SIZE: "10"}, {ArtifactKey.SIZE: True}, {ArtifactKey.NAME: "../etc/passwd"},
    {ArtifactKey.NAME: "a b"}, {ArtifactKey.URL: "file:///etc/passwd"}, {ArtifactKey.URL: "https://x/a b"},
    {ArtifactKey.URL: "https://x/\nb"},
])
def test_a_malformed_artifact_cannot_be_signed_or_verified(change: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        signing_bytes(head(**{Key.ARTIFACTS: [artifact(**change)]}))


@pytest.mark.parametrize("attempt", [0, -1, "2", 2.0, True])
def test_an_attempt_is_a_positive_integer(attempt: Any) -> None:
    with pytest.raises(TypeError):
        signing_bytes(head(**{Key.ATTEMPT: attempt}))
