"""Signed jobs: the agent runs only heads the service signed for this device, inside its policy.

Three layers: the key settings and the signature check (no broker); the agent's decisions on
each kind of head (an Agent whose broker link only records what it would publish); and the real
service, broker and agent, where a forger publishes straight to Mosquitto (anonymous dev
config: anyone may publish as anyone, the "compromised broker" case).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent import daemon, ed25519, ed25519_openssl, job_signature
from agent.daemon import OUTSIDE_POLICY, STALE, Agent, _Running
from agent.head import Head, parse_head
from agent.journal import Journal, read_entries
from agent.link import JobMessage
from agent.protocol import SERVICE_CLIENT_ID, JobStatus, Key, Topics, encode, format_time, signing_bytes, utc_now
from agent.settings import ENV_PREFIX, load_settings
from tests.conftest import Launcher
from tests.support.mosquitto import start_mosquitto
from tests.support.processes import wait_until

DEVICE = "dev1"
SERVICE_KEY = Ed25519PrivateKey.generate()
FORGER_KEY = Ed25519PrivateKey.generate()
REJECTED_KEYS = {Key.JOB_ID, Key.STATUS, Key.EXIT_CODE, Key.STDOUT, Key.STDERR, Key.STDOUT_TRUNCATED,
                 Key.STDERR_TRUNCATED, Key.START_TIME, Key.END_TIME, Key.REASON}


def public_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def head(job_id: str, command: str, seq: int, *, key: Ed25519PrivateKey | None = SERVICE_KEY,
         device: str = DEVICE, issued: datetime | None = None, floor: int | None = None,
         **after_signing: Any) -> dict[str, Any]:
    """A head like the service's (Floor: the Seq before, unless floor), issued now (or at issued), signed with
    key (None: unsigned), then changed by after_signing."""
    message: dict[str, Any] = {
        Key.JOB_ID: job_id, Key.PARENT_JOB_ID: "parent", Key.JOB_NAME: "test", Key.DEVICE_ID: device,
        Key.COMMAND: command, Key.TIMEOUT_SECONDS: 60, Key.SUCCESS_ON_RESTART: False, Key.SEQ: seq,
        Key.FLOOR: seq - 1 if floor is None else floor, Key.ISSUED_AT: format_time(issued or utc_now()),
        Key.SUBMITTED_TIME: "2024-05-01T12:00:00.000Z",
    }
    return signed(message, key, after_signing)


def idle(floor: int, *, key: Ed25519PrivateKey | None = SERVICE_KEY, device: str = DEVICE,
         issued: datetime | None = None, **after_signing: Any) -> dict[str, Any]:
    """An idle head like the service's: nothing pending, every Seq up to floor final."""
    message = {Key.DEVICE_ID: device, Key.FLOOR: floor, Key.ISSUED_AT: format_time(issued or utc_now())}
    return signed(message, key, after_signing)


def signed(message: dict[str, Any], key: Ed25519PrivateKey | None, after_signing: dict[str, Any]) -> dict[str, Any]:
    if key is not None:
        message[Key.SIGNATURE] = base64.b64encode(key.sign(signing_bytes(message))).decode()
    return {**message, **after_signing}


# --- the key setting (no broker) ------------------------------------------------------------


BASE_ARGS = ["--broker", "h:1", "--device-id", DEVICE]


@pytest.fixture
def clean_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)


def test_the_key_comes_from_a_file_or_the_flag_or_a_variable(tmp_path):
    key_file = tmp_path / "job-signing.pub"
    key_file.write_text(public_b64(SERVICE_KEY) + "\n")
    raw = base64.b64decode(public_b64(SERVICE_KEY))
    assert load_settings([*BASE_ARGS, "--server-key-file", str(key_file)], {}).server_keys == (raw,)
    assert load_settings([*BASE_ARGS, "--server-key", public_b64(SERVICE_KEY)], {}).server_keys == (raw,)
    assert load_settings(BASE_ARGS, {"OTA_AGENT_SERVER_KEY_FILE": str(key_file)}).server_keys == (raw,)
    assert load_settings(BASE_ARGS, {"OTA_AGENT_SERVER_KEY": public_b64(SERVICE_KEY)}).server_keys == (raw,)


def test_the_agent_refuses_to_start_without_a_key_and_says_where_to_get_it(clean_env, capsys):
    assert daemon.main(BASE_ARGS) == 2
    error = capsys.readouterr().err
    for text in ("--server-key-file", "OTA_AGENT_SERVER_KEY_FILE", "--server-key", "required",
                 "job-signing.pub", "GET /v1/signing-key"):
        assert text in error


@pytest.mark.parametrize("argv, names", [
    (["--server-key", "not base64!"], ("--server-key", "OTA_AGENT_SERVER_KEY", "not base64", "job-signing.pub")),
    (["--server-key", base64.b64encode(bytes(16)).decode()], ("--server-key", "16 bytes")),
    (["--server-key", base64.b64encode(b"\xff" * 31 + b"\x7f").decode()], ("--server-key", "not an Ed25519")),
    (["--server-key-file", "/nonexistent/job-signing.pub"], ("--server-key-file", "OTA_AGENT_SERVER_KEY_FILE",
                                                             "cannot be read")),
    (["--server-key", public_b64(SERVICE_KEY), "--server-key-file", "/x"], ("--server-key", "both set")),
])
def test_a_bad_key_exits_2_naming_the_flag_and_variable(clean_env, capsys, argv, names):
    assert daemon.main([*BASE_ARGS, *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ota-agent: error: ")
    for name in names:
        assert name in error


def test_a_key_file_with_something_else_in_it_names_the_file_flag(clean_env, capsys, tmp_path):
    key_file = tmp_path / "job-signing.pub"
    key_file.write_text("-----BEGIN PRIVATE KEY-----\n")
    assert daemon.main([*BASE_ARGS, "--server-key-file", str(key_file)]) == 2
    assert "--server-key-file (or OTA_AGENT_SERVER_KEY_FILE) is bad" in capsys.readouterr().err


# --- the signature check (no broker) --------------------------------------------------------


def check(message: dict[str, Any], key: Ed25519PrivateKey = SERVICE_KEY) -> str | None:
    public = base64.b64decode(public_b64(key))
    content = job_signature.signed_content(message)
    return job_signature.signature_problem(message.get(Key.SIGNATURE), content, (public,))


def test_a_head_the_service_signed_verifies():
    assert check(head("j1", "true", 1)) is None


@pytest.mark.parametrize("message, reason", [
    (head("j1", "true", 1, key=None), job_signature.NOT_SIGNED),
    (head("j1", "true", 1, key=FORGER_KEY), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, **{Key.COMMAND: "reboot"}), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, **{Key.DEVICE_ID: "dev2"}), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, **{Key.JOB_ID: "j2"}), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, **{Key.SEQ: 2}), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, **{Key.TIMEOUT_SECONDS: 61}), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, **{Key.SUCCESS_ON_RESTART: True}), job_signature.DOES_NOT_VERIFY),
    # Signed the same bytes, but not what the agent would read: the exact types are required.
    (head("j1", "true", 1, **{Key.SEQ: "1"}), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, **{Key.SEQ: 1.0}), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, **{Key.SEQ: True}), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, **{Key.TIMEOUT_SECONDS: 60.5}), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, **{Key.SUCCESS_ON_RESTART: 0}), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, **{Key.SIGNATURE: "not base64!"}), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, **{Key.SIGNATURE: 12}), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, **{Key.SIGNATURE: ""}), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, **{Key.SIGNATURE: "é"}), job_signature.DOES_NOT_VERIFY),
])
def test_a_head_that_is_not_the_services_fails_with_its_reason(message, reason):
    assert check(message) == reason


def test_fields_outside_the_signature_do_not_matter():
    assert check(head("j1", "true", 1, **{Key.JOB_NAME: "renamed", Key.SUBMITTED_TIME: None})) is None


def test_the_verifier_is_chosen_at_the_first_signed_head_and_said_once(monkeypatch, caplog):
    """Nothing is loaded for an unsigned head; the first signed one, idle or not, picks OpenSSL (under
    CI=true it must be found here) and says so once; every head after it uses the same."""
    monkeypatch.setattr(job_signature, "_VERIFIER", [])
    caplog.set_level("INFO", logger="ota-agent")
    assert check(head("j1", "true", 4, key=None)) == job_signature.NOT_SIGNED and job_signature._VERIFIER == []
    assert check(idle(3)) is None and check(idle(3, key=FORGER_KEY)) == job_signature.DOES_NOT_VERIFY
    chosen = job_signature._VERIFIER[0]
    if os.environ.get("CI") == "true":
        assert isinstance(getattr(chosen, "__self__", None), ed25519_openssl.OpenSSLVerifier), caplog.text
    assert check(head("j1", "true", 4)) is None and check(head("j1", "true", 4, key=FORGER_KEY)) is not None
    assert job_signature._VERIFIER == [chosen] and caplog.text.count("verifies job signatures") == 1


def test_without_libcrypto_the_pure_python_verifier_checks_the_heads(monkeypatch, caplog):
    monkeypatch.setattr(job_signature, "_VERIFIER", [])
    monkeypatch.setattr(ed25519_openssl, "libcrypto_path", lambda: None)
    caplog.set_level("INFO", logger="ota-agent")
    assert check(head("j1", "true", 1)) is None
    assert check(head("j1", "true", 1, key=FORGER_KEY)) == job_signature.DOES_NOT_VERIFY
    assert job_signature._VERIFIER == [ed25519.verify]
    assert "verifies job signatures in pure Python: no libcrypto is loaded in this process" in caplog.text


# --- the agent's decisions (no broker: the link records what would be published) --------------


class RecordingLink:
    job_topic = Topics().job(DEVICE)

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []

    def publish_status(self, message: dict[str, Any]) -> None:
        self.published.append(message)


class FakeRunner:
    def __init__(self) -> None:
        self.canceled: str | None = None

    def cancel(self, reason: str) -> None:
        self.canceled = reason


class DecidingAgent:
    """An Agent fed heads directly; _start only records what it would run."""

    def __init__(self, state_dir: Path, *flags: str) -> None:
        settings = load_settings([*BASE_ARGS, "--server-key", public_b64(SERVICE_KEY), *flags], {})
        self.journal = Journal.open(state_dir, seq_scope=settings.server_keys_b64)
        self.agent = Agent(settings, self.journal, {})
        self.link = RecordingLink()
        self.agent.link = self.link  # type: ignore[assignment]
        self.started: list[str] = []
        self.agent._start = self._start  # type: ignore[method-assign]
        self.agent._ready_at = 0.0

    def _start(self, head: Head) -> None:
        self.journal.record_started(head.job_id, head.seq, utc_now())
        self.started.append(head.job_id)

    def deliver(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """Hand one head to the main loop; return what it published."""
        before = len(self.link.published)
        self.agent._on_job_message(JobMessage(RecordingLink.job_topic, encode(message)))
        self.agent._act_on_head()
        return self.link.published[before:]

    def run_as_current(self, message: dict[str, Any]) -> FakeRunner:
        """Pretend the head is the running job."""
        parsed = parse_head(encode(message), 60)
        runner = FakeRunner()
        self.agent._running = _Running(parsed, runner, None)  # type: ignore[arg-type]
        self.journal.record_started(parsed.job_id, parsed.seq, utc_now())
        return runner


@pytest.fixture
def deciding(tmp_path):
    return lambda *flags: DecidingAgent(tmp_path / "state", *flags)


def only_rejection(published: list[dict[str, Any]], job_id: str) -> dict[str, Any]:
    assert len(published) == 1, published
    message = published[0]
    assert set(message) == REJECTED_KEYS
    assert (message[Key.JOB_ID], message[Key.STATUS], message[Key.EXIT_CODE]) == (job_id, "REJECTED", None)
    assert (message[Key.STDOUT], message[Key.STDERR]) == ("", "")
    assert (message[Key.STDOUT_TRUNCATED], message[Key.STDERR_TRUNCATED]) == (False, False)
    assert message[Key.START_TIME].endswith("Z") and message[Key.END_TIME].endswith("Z")
    return message


def test_a_signed_head_for_this_device_runs(deciding):
    agent = deciding()
    assert agent.deliver(head("j1", "true", 1)) == []
    assert agent.started == ["j1"] and agent.journal.highest_seq == 1


@pytest.mark.parametrize("message, reason", [
    (head("j1", "true", 1, key=None), "the job is not signed"),
    (head("j1", "true", 1, key=FORGER_KEY), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, **{Key.COMMAND: "reboot"}), job_signature.DOES_NOT_VERIFY),
    (head("j1", "true", 1, device="dev2"), "the job is for device dev2"),
    (head("j1", "true", 1, key=FORGER_KEY, device="dev2"), job_signature.DOES_NOT_VERIFY),
])
def test_a_head_that_is_not_the_services_for_this_device_is_rejected_and_nothing_is_journalled(
        deciding, message, reason):
    agent = deciding()
    assert only_rejection(agent.deliver(message), "j1")[Key.REASON] == reason
    assert agent.started == [] and len(agent.journal) == 0 and agent.journal.highest_seq is None
    assert only_rejection(agent.deliver(message), "j1")[Key.REASON] == reason  # the same again, every time


def test_a_command_outside_the_policy_is_rejected_journalled_and_never_run(deciding):
    agent = deciding("--allow-prefix", "echo")
    rejected = only_rejection(agent.deliver(head("j1", "touch /tmp/x", 5)), "j1")
    assert rejected[Key.REASON] == f"{OUTSIDE_POLICY}: it matches no --allow-prefix rule"
    assert OUTSIDE_POLICY == "the command is outside this device's policy"
    assert agent.journal.get("j1").result == rejected and agent.journal.highest_seq == 5
    assert agent.deliver(head("j1", "touch /tmp/x", 5)) == [rejected]  # redelivered: resent as stored
    agent.deliver(head("j2", "echo hi", 6))
    assert agent.started == ["j2"]


def test_a_policy_rejection_stands_after_the_policy_is_widened(deciding):
    deciding("--allow-prefix", "echo").deliver(head("j1", "touch /tmp/x", 5))
    widened = deciding()
    assert only_rejection(widened.deliver(head("j1", "touch /tmp/x", 5)), "j1")[Key.REASON].startswith(OUTSIDE_POLICY)
    assert widened.started == []


def test_an_old_signed_head_the_journal_forgot_is_rejected_as_stale(deciding):
    agent = deciding()
    agent.journal.max_entries = 2
    for seq in (1, 2, 3):
        agent.deliver(head(f"j{seq}", "true", seq, floor=0))  # floors that do not cover them: Seq alone
        agent.agent._head = None
    assert agent.journal.get("j1") is None and agent.journal.highest_seq == 3  # pruned, but remembered
    rejected = only_rejection(agent.deliver(head("j1", "true", 1, floor=0)), "j1")
    assert rejected[Key.REASON] == STALE == "the job is older than one this device already ran"
    assert agent.started == ["j1", "j2", "j3"] and agent.journal.get("j1") is None
    assert deciding().journal.highest_seq == 3  # it survives a restart


def test_the_highest_seq_belongs_to_the_key_it_was_signed_with(tmp_path):
    state = tmp_path / "state"
    journal = Journal.open(state, seq_scope="old key")
    journal.record_started("j1", 9, utc_now())
    assert Journal.open(state, seq_scope="old key").highest_seq == 9
    assert Journal.open(state, seq_scope="new key").highest_seq is None  # a new service key starts afresh


def test_a_signed_head_already_journalled_resends_its_result(deciding):
    agent = deciding()
    agent.deliver(head("j1", "true", 1))
    result = {Key.JOB_ID: "j1", Key.STATUS: "SUCCEEDED", Key.EXIT_CODE: 0}
    agent.journal.record_result("j1", result)
    assert agent.deliver(head("j1", "true", 1)) == [result]
    assert agent.started == ["j1"]


@pytest.mark.parametrize("key", [None, FORGER_KEY])
def test_a_forged_head_naming_a_known_job_publishes_nothing_and_changes_nothing(deciding, key, caplog):
    agent = deciding()
    agent.deliver(head("j1", "true", 1))  # started, no result yet: a signed head would make it INTERRUPTED
    journal_before = agent.journal.path.read_bytes()
    assert agent.deliver(head("j1", "true", 1, key=key, **{Key.SUCCESS_ON_RESTART: True})) == []
    assert agent.journal.path.read_bytes() == journal_before
    assert agent.journal.get("j1").result is None
    assert "the journal's result stands" in caplog.text


def test_while_a_job_runs_a_forged_or_replayed_head_does_not_cancel_it(deciding):
    agent = deciding()
    runner = agent.run_as_current(head("j5", "sleep 60", 5))
    for message in (head("j6", "true", 6, key=None), head("j6", "true", 6, key=FORGER_KEY),
                    head("j6", "true", 6, device="dev2"), head("j4", "true", 4)):
        assert agent.deliver(message) == []
        assert runner.canceled is None, message
    assert agent.started == []


def test_while_a_job_runs_a_newer_signed_head_cancels_it(deciding):
    agent = deciding("--allow-prefix", "echo")
    runner = agent.run_as_current(head("j5", "echo long", 5))
    agent.deliver(head("j6", "reboot", 6))  # the service moved on, even to a job this device will refuse
    assert runner.canceled == "the head moved to job j6 while the command ran"


# --- the real service, the real broker, the real agent ----------------------------------------


class Wire:
    """A plain MQTT client on the broker: watches topics, and publishes as whoever it says."""

    def __init__(self, broker_url: str, client_id: str | None = None) -> None:
        host, port = broker_url.removeprefix("mqtt://").rsplit(":", 1)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"wire-{uuid.uuid4().hex[:8]}")
        self.client.on_message = lambda c, u, msg: self.messages.put((msg.topic, bytes(msg.payload)))
        self.client.connect(host, int(port))
        self.client.loop_start()

    def watch(self, topic: str) -> None:
        subscribed: queue.Queue[object] = queue.Queue()
        self.client.on_subscribe = lambda *args: subscribed.put(args)
        self.client.subscribe(topic, qos=1)
        subscribed.get(timeout=15)

    def publish(self, topic: str, message: dict[str, Any]) -> None:
        self.client.publish(topic, encode(message), qos=1, retain=True).wait_for_publish(15)

    def next_on(self, topic: str, when: Any = lambda m: True, timeout: float = 20) -> dict[str, Any]:
        """The next JSON message on topic for which when(message) holds."""
        def found() -> dict[str, Any] | None:
            try:
                got_topic, payload = self.messages.get(timeout=0.2)
            except queue.Empty:
                return None
            message = json.loads(payload) if payload else {}
            return message if got_topic == topic and when(message) else None

        return wait_until(found, timeout, f"a message on {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def journal_job_ids(agent: Any) -> list[str]:
    return [entry["JobId"] for entry in read_entries(agent.state_dir / agent.device_id)]


def forge(broker_url: str, device: str, message: dict[str, Any]) -> None:
    """Publish a retained head straight to the broker, as the service's own MQTT client."""
    forger = Wire(broker_url, client_id=SERVICE_CLIENT_ID)
    try:
        forger.publish(Topics().job(device), message)
    finally:
        forger.close()


@pytest.fixture
def mosquitto_fleet(launch: Launcher, tmp_path: Path):
    """Mosquitto, the service on it, dev1's agent online and subscribed, a wire watching dev1's status."""
    with start_mosquitto(tmp_path) as broker:
        service = launch.service(mqtt_url=broker.url)
        agent = launch.agent(service, DEVICE, service.api.device(DEVICE))
        wire = Wire(broker.url)
        try:
            wire.watch(Topics().status(DEVICE))
            wait_until(lambda: "subscribed to" in agent.log(), 20, "the agent to subscribe")
            yield broker, service, agent, wire
        finally:
            wire.close()


@pytest.mark.mosquitto
def test_a_forged_job_from_the_services_own_identity_is_rejected_and_the_queue_goes_on(
        mosquitto_fleet, tmp_path: Path) -> None:
    broker, service, agent, wire = mosquitto_fleet
    marker = tmp_path / "forged-job-ran"
    forge(broker.url, DEVICE, head("forged-1", f"touch {marker}", 10**9, key=FORGER_KEY))

    rejected = wire.next_on(Topics().status(DEVICE), lambda m: m[Key.JOB_ID] == "forged-1")
    assert set(rejected) == REJECTED_KEYS
    assert (rejected[Key.STATUS], rejected[Key.REASON]) == ("REJECTED", job_signature.DOES_NOT_VERIFY)
    assert (rejected[Key.EXIT_CODE], rejected[Key.STDOUT], rejected[Key.STDERR]) == (None, "", "")

    api = service.api
    real = api.submit(api.workflow("echo real"), DeviceId=DEVICE)
    assert api.wait_job(real)["Result"] == "real\n"
    assert not marker.exists()
    assert "forged-1" not in journal_job_ids(agent)
    assert api.ok("GET", f"/v1/device/{DEVICE}")["PendingJobs"] == 0


@pytest.mark.mosquitto
def test_a_real_agent_verifies_with_openssl_and_says_so_once(mosquitto_fleet) -> None:
    """The agent process finds the libcrypto its ssl module mapped (required under CI=true) and logs
    its choice once, however many heads come."""
    _, service, agent, _ = mosquitto_fleet
    api = service.api
    for _ in range(2):
        assert api.wait_job(api.submit(api.workflow("true"), DeviceId=DEVICE))["Status"] == "SUCCEEDED"
    lines = [line for line in agent.log().splitlines() if "verifies job signatures" in line]
    assert len(lines) == 1, agent.log()
    if os.environ.get("CI") == "true":
        assert "verifies job signatures with the system's OpenSSL (" in lines[0] and "libcrypto.so" in lines[0]


@pytest.mark.mosquitto
def test_an_unsigned_job_is_rejected_and_runs_nothing(mosquitto_fleet, tmp_path: Path) -> None:
    broker, service, agent, wire = mosquitto_fleet
    marker = tmp_path / "unsigned-job-ran"
    forge(broker.url, DEVICE, head("unsigned-1", f"touch {marker}", 1, key=None))

    rejected = wire.next_on(Topics().status(DEVICE), lambda m: m[Key.JOB_ID] == "unsigned-1")
    assert (rejected[Key.STATUS], rejected[Key.REASON]) == ("REJECTED", "the job is not signed")
    api = service.api
    assert api.wait_job(api.submit(api.workflow("true"), DeviceId=DEVICE))["Status"] == "SUCCEEDED"
    assert not marker.exists() and "unsigned-1" not in journal_job_ids(agent)


@pytest.mark.mosquitto
def test_another_devices_signed_job_replayed_to_this_device_is_rejected(mosquitto_fleet, tmp_path: Path) -> None:
    broker, service, agent, wire = mosquitto_fleet
    api = service.api
    api.device("dev2")  # no agent: its job stays queued, its signed head retained
    marker = tmp_path / "dev2-job-ran"
    wire.watch(Topics().job("dev2"))
    dev2_job = api.submit(api.workflow(f"touch {marker}"), DeviceId="dev2")
    dev2_head = wire.next_on(Topics().job("dev2"), lambda m: m.get(Key.DEVICE_ID) == "dev2" and Key.JOB_ID in m)
    assert job_signature.signed_content(dev2_head) is not None and Key.SIGNATURE in dev2_head

    forge(broker.url, DEVICE, dev2_head)  # a genuine signature, on the wrong device's topic
    rejected = wire.next_on(Topics().status(DEVICE), lambda m: m[Key.JOB_ID] == dev2_head[Key.JOB_ID])
    assert (rejected[Key.STATUS], rejected[Key.REASON]) == ("REJECTED", "the job is for device dev2")
    assert not marker.exists()
    assert api.ok("GET", f"/v1/job/{dev2_job}")["Status"] == "QUEUED"  # dev2's job is untouched


@pytest.mark.mosquitto
def test_a_replayed_head_of_a_job_already_run_resends_its_result_and_runs_nothing(
        mosquitto_fleet, tmp_path: Path) -> None:
    broker, service, agent, wire = mosquitto_fleet
    api = service.api
    runs = tmp_path / "runs"
    wire.watch(Topics().job(DEVICE))
    job = api.submit(api.workflow(f"echo once >> {runs}"), DeviceId=DEVICE)
    signed_head = wire.next_on(Topics().job(DEVICE), lambda m: Key.JOB_ID in m)  # not the idle head
    api.wait_job(job)
    result = wire.next_on(Topics().status(DEVICE), lambda m: m[Key.STATUS] == "SUCCEEDED")

    forge(broker.url, DEVICE, signed_head)
    assert wire.next_on(Topics().status(DEVICE), lambda m: m[Key.JOB_ID] == signed_head[Key.JOB_ID]) == result
    assert runs.read_text() == "once\n"


def test_the_local_policy_rejects_through_the_real_service_and_allows_the_rest(
        launch: Launcher, tmp_path: Path) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "hello.sh").write_text('#!/bin/sh\necho "hello $1"\n')
    (scripts / "hello.sh").chmod(0o755)
    marker = tmp_path / "outside-policy-ran"
    service = launch.service()
    api = service.api
    key = api.ok("GET", "/v1/signing-key")
    assert key["Algorithm"] == "Ed25519"
    launch.agent(service, DEVICE, api.device(DEVICE), "--server-key", key["PublicKey"],
                 "--allow-prefix", "echo", "--allow-scripts-dir", str(scripts))

    outside = api.submit(api.workflow(f"touch {marker}"), DeviceId=DEVICE)
    chained = api.submit(api.workflow(f"echo hi; touch {marker}"), DeviceId=DEVICE)
    inside = api.submit(api.workflow("echo inside"), DeviceId=DEVICE)
    script = api.submit(api.workflow(f"{scripts}/hello.sh world"), DeviceId=DEVICE)

    for job_id in (outside, chained):
        assert api.wait_job(job_id)["Status"] == JobStatus.REJECTED.value
        child = api.ok("GET", f"/v1/job/{job_id}/childjobs")[0]
        assert child["Reason"].startswith(OUTSIDE_POLICY) and (child["ExitCode"], child["Stdout"]) == (None, "")
    assert api.wait_job(inside)["Result"] == "inside\n"
    assert api.wait_job(script)["Result"] == "hello world\n"
    assert not marker.exists()
