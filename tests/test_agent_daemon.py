"""The agent daemon: settings, heads, and the real agent process against a real Mosquitto.

The Mosquitto tests run `python -m agent` as a subprocess and play the service's part with a
plain paho client: publish retained heads signed with a key the test makes (the agent is given
its public half), read status and presence. Commands append to files so a test can count how
many times each one ran.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import queue
import re
import signal
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent import daemon, link
from agent.head import Head, parse_head
from agent.protocol import (
    DEFAULT_PREFIX,
    JobStatus,
    Key,
    MessageError,
    Presence,
    Topics,
    encode,
    format_time,
    signing_bytes,
    utc_now,
)
from agent.settings import DEFAULT_KILL_GRACE, ENV_PREFIX, SettingsError, load_settings
from agent.untrusted import shown
from tests.support.mosquitto import start_mosquitto
from tests.support.tls import ThrowawayCa

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICE = "dev-1"
WAIT = 20.0  # seconds any one expected message or process exit may take
SIGNING_KEY = Ed25519PrivateKey.generate()  # plays the service's job-signing key
PUBLIC_KEY = base64.b64encode(SIGNING_KEY.public_key().public_bytes(
    serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
KEY_ARGS = ["--server-key", PUBLIC_KEY]


# --- settings (no broker) -------------------------------------------------------------------


def test_flags_win_over_environment_variables(tmp_path):
    env = {"OTA_AGENT_BROKER": "mqtt://env-host:1", "OTA_AGENT_DEVICE_ID": "env-dev", "OTA_AGENT_OUTPUT_CAP": "5"}
    settings = load_settings(["--broker", "flag-host:2", "--state-dir", str(tmp_path), *KEY_ARGS], env)
    assert (settings.broker_host, settings.broker_port) == ("flag-host", 2)
    assert (settings.device_id, settings.output_cap) == ("env-dev", 5)


def test_environment_alone_configures_the_agent(tmp_path):
    env = {"OTA_AGENT_BROKER": "mqtt://broker.lan:1884", "OTA_AGENT_DEVICE_ID": "pi-7",
           "OTA_AGENT_STATE_DIR": str(tmp_path), "OTA_AGENT_PREFIX": "/fleet/",
           "OTA_AGENT_DEFAULT_TIMEOUT": "90", "OTA_AGENT_LOG_LEVEL": "debug", "OTA_AGENT_PASSWORD": "s3cret",
           "OTA_AGENT_SERVER_KEY": PUBLIC_KEY}
    settings = load_settings([], env)
    assert (settings.broker_host, settings.broker_port, settings.device_id) == ("broker.lan", 1884, "pi-7")
    assert (settings.prefix, settings.default_timeout, settings.log_level) == ("fleet", 90, "DEBUG")
    assert (settings.username, settings.password) == ("pi-7", "s3cret")  # username defaults to the device id
    assert settings.journal_dir == tmp_path / "pi-7"
    assert "s3cret" not in repr(settings)


def test_defaults_fill_the_optional_settings():
    settings = load_settings(["--broker", "localhost", "--device-id", "d", *KEY_ARGS], {})
    assert (settings.broker_port, settings.prefix, settings.output_cap) == (1883, DEFAULT_PREFIX, 64 * 1024)
    assert settings.state_dir.name == "ota-agent"


def test_a_value_may_start_with_a_dash():
    settings = load_settings(["--broker", "h:1", "--device-id", "d", "--password", "-Xy_z", *KEY_ARGS], {})
    assert settings.password == "-Xy_z"


def test_kill_grace_is_a_number_of_seconds():
    base = ["--broker", "h:1", "--device-id", "d", *KEY_ARGS]
    assert load_settings([*base, "--kill-grace", "0.5"], {}).kill_grace == 0.5
    assert load_settings(base, {}).kill_grace == DEFAULT_KILL_GRACE


def test_commands_get_the_device_id_but_not_the_agent_settings():
    env = daemon.command_environment({"PATH": "/bin", "OTA_AGENT_PASSWORD": "s3cret"}, "pi-7")
    assert env == {"PATH": "/bin", "OTA_DEVICE_ID": "pi-7"}


def test_password_file_is_read_without_its_newline(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    settings = load_settings(["--broker", "h:1", "--device-id", "d", "--password-file", str(secret), *KEY_ARGS], {})
    assert settings.password == "hunter2"


def test_mqtts_checks_the_brokers_certificate_and_name(tmp_path):
    pki = ThrowawayCa(tmp_path)
    settings = load_settings(["--broker", "mqtts://broker.lan", "--device-id", "d", *KEY_ARGS],
                             {"OTA_AGENT_CA_FILE": str(pki.ca_file)})
    assert (settings.broker_port, settings.broker_url) == (8883, "mqtts://broker.lan:8883")
    assert settings.tls.check_hostname and settings.tls.verify_mode == ssl.CERT_REQUIRED
    assert settings.tls.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert load_settings(["--broker", "mqtt://broker.lan", "--device-id", "d", *KEY_ARGS], {}).tls is None


def test_a_client_certificate_that_is_not_one_is_refused(tmp_path):
    pki = ThrowawayCa(tmp_path)
    argv = ["--broker", "mqtts://h", "--device-id", "d", "--ca-file", str(pki.ca_file), *KEY_ARGS]
    with pytest.raises(SettingsError, match="--cert-file .* not a PEM certificate"):
        load_settings([*argv, "--cert-file", str(pki.server.key), "--key-file", str(pki.server.key)], {})
    device = pki.client("d")
    assert load_settings([*argv, "--cert-file", str(device.cert), "--key-file", str(device.key)], {}).tls


@pytest.mark.parametrize("argv, env, names", [
    ([], {"OTA_AGENT_DEVICE_ID": "d"}, ("--broker", "OTA_AGENT_BROKER", "required")),
    (["--broker", "h:1"], {}, ("--device-id", "OTA_AGENT_DEVICE_ID", "required")),
    (["--broker", "http://h", "--device-id", "d"], {}, ("--broker", "expected mqtt://HOST:PORT")),
    (["--broker", "h:1", "--device-id", "d", "--cert-file", "/x"], {}, ("--cert-file", "OTA_AGENT_CERT_FILE", "mqtts://")),
    (["--broker", "h:1", "--device-id", "d", "--ca-file", "/x"], {},
     ("--ca-file", "OTA_AGENT_CA_FILE", "cannot be read")),
    (["--broker", "h:1", "--device-id", "d"], {"OTA_AGENT_ARTIFACT_CACHE_SIZE": "1.5G"},
     ("--artifact-cache-size", "OTA_AGENT_ARTIFACT_CACHE_SIZE", "number of bytes")),
    (["--broker", "mqtts://h", "--device-id", "d", "--ca-file", "/nonexistent/ca.crt"], {},
     ("--ca-file", "cannot be read")),
    (["--broker", "mqtts://h", "--device-id", "d"], {"OTA_AGENT_CERT_FILE": "/x"}, ("--cert-file", "--key-file")),
    (["--broker", "mqtts://h", "--device-id", "d", "--cert-file", "/nonexistent/c", "--key-file", "/nonexistent/k"],
     {}, ("--cert-file", "cannot be read")),
    (["--broker", "h:70000", "--device-id", "d"], {}, ("--broker", "port")),
    (["--broker", "h:1", "--device-id", "a/b"], {}, ("--device-id", "does not match")),
    (["--broker", "h:1", "--device-id", "d"], {"OTA_AGENT_OUTPUT_CAP": "lots"},
     ("--output-cap", "OTA_AGENT_OUTPUT_CAP")),
    (["--broker", "h:1", "--device-id", "d", "--default-timeout", "0"], {}, ("--default-timeout", "above 0")),
    (["--broker", "h:1", "--device-id", "d", "--log-level", "loud"], {}, ("--log-level", "OTA_AGENT_LOG_LEVEL")),
    (["--broker", "h:1", "--device-id", "d", "--kill-grace", "nan"], {}, ("--kill-grace", "above 0")),
    (["--broker", "h:1", "--device-id", "d", "--prefix", "a/+"], {}, ("--prefix", "invalid topic prefix")),
    (["--broker", "h:1", "--device-id", "d", "--password", "x", "--password-file", "/x"], {}, ("--password-file",)),
    (["--broker", "h:1", "--device-id", "d", "--password-file", "/nonexistent/pw"], {}, ("--password-file",
                                                                                      "cannot be read")),
])
def test_a_missing_or_bad_setting_exits_2_naming_the_flag_and_variable(monkeypatch, capsys, argv, env, names):
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("OTA_AGENT_SERVER_KEY", PUBLIC_KEY)  # so only the setting under test is bad
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert daemon.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("ota-agent: error: ")
    for name in names:
        assert name in error


def test_a_settings_error_names_flag_and_variable():
    with pytest.raises(SettingsError, match=r"--state-dir \(or OTA_AGENT_STATE_DIR\)"):
        raise SettingsError("state_dir", "is bad")


def test_version_flag_prints_the_version():
    done = subprocess.run([sys.executable, "-m", "agent", "--version"], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=agent_env(), timeout=WAIT)
    assert done.returncode == 0 and done.stdout.startswith("ota-agent ")


# --- heads (no broker) ----------------------------------------------------------------------


def head_payload(**fields):
    return encode({Key.JOB_ID: "j1", Key.COMMAND: "true", Key.DEVICE_ID: DEVICE, **fields})


def test_a_head_is_parsed_with_the_default_timeout_when_it_has_none():
    head = parse_head(head_payload(**{Key.SEQ: 4, Key.SUCCESS_ON_RESTART: True}), 60)
    assert head == Head(job_id="j1", command="true", timeout_seconds=60, success_on_restart=True, seq=4,
                        floor=None, issued_at=None, device_id=DEVICE, signature=None, signed_content=None)
    assert parse_head(head_payload(**{Key.TIMEOUT_SECONDS: 5}), 60).timeout_seconds == 5


def test_a_head_keeps_what_its_signature_must_sign():
    fields = {Key.SEQ: 4, Key.FLOOR: 3, Key.ISSUED_AT: "2025-03-14T09:27:00.000Z", Key.TIMEOUT_SECONDS: 60,
              Key.SUCCESS_ON_RESTART: False, Key.SIGNATURE: "c2ln"}
    head = parse_head(head_payload(**fields), 60)
    assert head.signature == "c2ln"
    assert head.signed_content == signing_bytes({Key.JOB_ID: "j1", Key.COMMAND: "true", Key.DEVICE_ID: DEVICE,
                                                 **fields})


def test_a_head_for_another_device_is_parsed_so_it_can_be_rejected():
    assert parse_head(head_payload(**{Key.DEVICE_ID: "someone-else"}), 60).device_id == "someone-else"


def test_an_empty_payload_is_not_a_head_it_is_unsigned():
    with pytest.raises(MessageError, match="empty payload"):
        parse_head(b"", 60)


def test_a_head_without_a_job_id_is_an_idle_head():
    idle = parse_head(encode({Key.DEVICE_ID: DEVICE, Key.FLOOR: 9, Key.ISSUED_AT: "2025-03-14T09:27:00.000Z",
                              Key.SIGNATURE: "c2ln"}), 60)
    assert (idle.is_idle, idle.floor, idle.device_id, idle.command) == (True, 9, DEVICE, "")
    assert idle.signed_content == f"ota-bridge idle v2\n{DEVICE}\n9\n2025-03-14T09:27:00.000Z".encode()


@pytest.mark.parametrize("payload", [
    b"not json",
    b"[1, 2]",
    encode({Key.COMMAND: "true"}),
    encode({Key.JOB_ID: "j1"}),
    head_payload(**{Key.TIMEOUT_SECONDS: -1}),
    head_payload(**{Key.COMMAND: "x" * (256 * 1024)}),
    head_payload(**{Key.JOB_ID: "not a job id"}),  # no report about it could be accepted: ignored
    head_payload(**{Key.JOB_ID: "x" * 65}),
    head_payload(**{Key.SEQ: 4, Key.FLOOR: 4}),  # a floor must be below the head's own Seq
])
def test_a_bad_head_is_refused(payload):
    with pytest.raises(MessageError):
        parse_head(payload, 60)


# --- the real agent against a real Mosquitto -----------------------------------------------


def agent_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


class AgentProcess:
    """One `python -m agent` process; its stderr goes to a log file."""

    def __init__(self, port: int, state_dir: Path, log_path: Path, *flags: str) -> None:
        self.log_path = log_path
        argv = [sys.executable, "-m", "agent", "--broker", f"mqtt://127.0.0.1:{port}", "--device-id", DEVICE,
                "--state-dir", str(state_dir), "--log-level", "DEBUG", *KEY_ARGS, *flags]
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, cwd=state_dir.parent, env=agent_env(),
                                            stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=WAIT)

    def wait_for_log(self, text: str) -> None:
        deadline = time.monotonic() + WAIT
        while text not in self.log():
            assert time.monotonic() < deadline, f"agent never logged {text!r}:\n{self.log()}"
            time.sleep(0.05)


class Service:
    """Plays the ota-bridge service: publishes signed heads, reads statuses and presence."""

    def __init__(self, port: int) -> None:
        self.topics = Topics(DEFAULT_PREFIX)
        self._seqs: dict[str, int] = {}  # each job id keeps its Seq, new ones count up
        self._next_seq = itertools.count(1)
        self.statuses: queue.Queue[dict] = queue.Queue()
        self.presence: queue.Queue[dict] = queue.Queue()
        self.subscribed: queue.Queue[object] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-service-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self.subscribed.put(args)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(self.topics.status(DEVICE), 1), (self.topics.presence(DEVICE), 1)])
        self.subscribed.get(timeout=WAIT)

    def _on_message(self, client, userdata, message):
        leaf = self.topics.parse(message.topic)[1]
        target = self.statuses if leaf == Topics.STATUS else self.presence
        target.put(json.loads(message.payload) if message.payload else {})

    def publish_head(self, job_id: str, command: str, **fields) -> None:
        seq = self._seqs.setdefault(job_id, next(self._next_seq))
        head = {Key.JOB_ID: job_id, Key.PARENT_JOB_ID: "parent", Key.JOB_NAME: "test", Key.DEVICE_ID: DEVICE,
                Key.COMMAND: command, Key.TIMEOUT_SECONDS: 60, Key.SUCCESS_ON_RESTART: False, Key.SEQ: seq,
                Key.FLOOR: seq - 1, Key.ISSUED_AT: format_time(utc_now()),
                Key.SUBMITTED_TIME: "2024-05-01T12:00:00.000Z", **fields}
        self.publish_signed(head)

    def publish_signed(self, head: dict) -> None:
        head[Key.SIGNATURE] = base64.b64encode(SIGNING_KEY.sign(signing_bytes(head))).decode()
        self.publish_raw(encode(head))

    def publish_raw(self, payload: bytes) -> None:
        self.client.publish(self.topics.job(DEVICE), payload, qos=1, retain=True).wait_for_publish(WAIT)

    def clear_head(self) -> None:
        """Publish the idle head: nothing pending, every job so far final."""
        floor = max(self._seqs.values(), default=0)
        self.publish_signed({Key.DEVICE_ID: DEVICE, Key.FLOOR: floor, Key.ISSUED_AT: format_time(utc_now())})

    def next_status(self) -> dict:
        try:
            return self.statuses.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no status message within {WAIT} s") from None

    def expect_status(self, job_id: str, status: JobStatus) -> dict:
        message = self.next_status()
        assert (message[Key.JOB_ID], message[Key.STATUS]) == (job_id, status.value), message
        return message

    def expect_presence(self, presence: Presence) -> dict:
        deadline = time.monotonic() + WAIT
        while True:  # an older retained value may come first
            message = self.presence.get(timeout=max(0.01, deadline - time.monotonic()))
            if message.get(Key.PRESENCE) == presence.value:
                return message

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        # Drop the callbacks' references back to this object, so the client is freed (and paho
        # closes its sockets) at once rather than by a later garbage collection.
        self.client.on_message = self.client.on_subscribe = None


@pytest.fixture
def broker(tmp_path):
    with start_mosquitto(tmp_path) as running:
        yield running


@pytest.fixture
def groups_file(tmp_path):
    """Commands write their process group id here; every group left is killed at the end."""
    path = tmp_path / "groups"
    yield path
    if path.exists():
        for pgid in {int(line) for line in path.read_text().split()}:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def start_agent(tmp_path, broker):
    """A factory of agent processes sharing one state dir; all are killed at the end."""
    started: list[AgentProcess] = []
    state = tmp_path / "state"

    def start(*flags: str) -> AgentProcess:
        agent = AgentProcess(broker.port, state, tmp_path / f"agent-{len(started)}.log", *flags)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait(timeout=WAIT)


@pytest.fixture
def service(broker):
    client = Service(broker.port)
    yield client
    client.close()


@pytest.fixture
def ran(tmp_path):
    """A file each test command appends its name to: one line per run."""
    return tmp_path / "ran"


def job(ran: Path, groups: Path, name: str, then: str = "") -> str:
    return f"echo $$ >> {groups}; echo {name} >> {ran}; {then}"


def live_group_members(pgid: int) -> list[int]:
    """Pids in the process group that are alive (zombies waiting for init do not count)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def runs(ran: Path) -> list[str]:
    return ran.read_text().split() if ran.exists() else []


def wait_until_running(ran: Path, name: str) -> None:
    """IN_PROGRESS is sent before the command starts; wait until it has really started."""
    deadline = time.monotonic() + WAIT
    while name not in runs(ran):
        assert time.monotonic() < deadline, f"command {name} never started"
        time.sleep(0.02)


def ready_agent(start_agent, service) -> AgentProcess:
    """Start an agent and wait until it is online and subscribed to its head."""
    agent = start_agent()
    service.expect_presence(Presence.ONLINE)
    agent.wait_for_log("subscribed to")
    return agent


@pytest.mark.mosquitto
def test_a_head_is_run_and_reported_in_progress_then_succeeded(start_agent, service, ran, groups_file):
    ready_agent(start_agent, service)
    service.publish_head("j1", job(ran, groups_file, "j1", 'echo "hello $OTA_DEVICE_ID $OTA_JOB_ID"; echo oops >&2'))

    started = service.expect_status("j1", JobStatus.IN_PROGRESS)
    assert set(started) == {Key.JOB_ID, Key.STATUS, Key.START_TIME}
    final = service.expect_status("j1", JobStatus.SUCCEEDED)
    assert (final[Key.EXIT_CODE], final[Key.STDOUT], final[Key.STDERR]) == (0, f"hello {DEVICE} j1\n", "oops\n")
    assert (final[Key.STDOUT_TRUNCATED], final[Key.STDERR_TRUNCATED], final[Key.REASON]) == (False, False, None)
    assert final[Key.START_TIME] == started[Key.START_TIME] and final[Key.END_TIME].endswith("Z")
    assert runs(ran) == ["j1"]


@pytest.mark.mosquitto
def test_a_failing_command_is_reported_failed_with_its_exit_code(start_agent, service, ran, groups_file):
    ready_agent(start_agent, service)
    service.publish_head("j1", job(ran, groups_file, "j1", "exit 3"))
    service.expect_status("j1", JobStatus.IN_PROGRESS)
    assert service.expect_status("j1", JobStatus.FAILED)[Key.EXIT_CODE] == 3


@pytest.mark.mosquitto
def test_the_same_head_again_and_a_restart_resend_the_stored_result_without_rerunning(
        start_agent, service, ran, groups_file):
    agent = ready_agent(start_agent, service)
    service.publish_head("j1", job(ran, groups_file, "j1", "echo once"))
    service.expect_status("j1", JobStatus.IN_PROGRESS)
    final = service.expect_status("j1", JobStatus.SUCCEEDED)

    service.publish_head("j1", job(ran, groups_file, "j1", "echo once"))  # the service republished its head
    assert service.next_status() == final

    assert agent.stop() == 0
    ready_agent(start_agent, service)  # the retained head is delivered again on connect
    assert service.next_status() == final
    assert runs(ran) == ["j1"]


@pytest.mark.mosquitto
def test_a_new_head_while_a_job_runs_cancels_it_and_runs_the_next(start_agent, service, ran, groups_file):
    ready_agent(start_agent, service)
    service.publish_head("j1", job(ran, groups_file, "j1", "sleep 300"))
    service.expect_status("j1", JobStatus.IN_PROGRESS)
    wait_until_running(ran, "j1")
    service.publish_head("j1", job(ran, groups_file, "j1", "sleep 300"))  # a duplicate changes nothing
    service.publish_head("j2", job(ran, groups_file, "j2"))

    canceled = service.expect_status("j1", JobStatus.CANCELED)
    assert canceled[Key.EXIT_CODE] is None and "j2" in canceled[Key.REASON]
    service.expect_status("j2", JobStatus.IN_PROGRESS)
    service.expect_status("j2", JobStatus.SUCCEEDED)
    assert runs(ran) == ["j1", "j2"]


@pytest.mark.mosquitto
def test_clearing_the_head_while_a_job_runs_cancels_it(start_agent, service, ran, groups_file):
    ready_agent(start_agent, service)
    service.publish_head("j1", job(ran, groups_file, "j1", "sleep 300"))
    service.expect_status("j1", JobStatus.IN_PROGRESS)
    wait_until_running(ran, "j1")
    service.clear_head()

    canceled = service.expect_status("j1", JobStatus.CANCELED)
    assert "cleared" in canceled[Key.REASON]
    assert live_group_members(int(groups_file.read_text())) == []


@pytest.mark.mosquitto
@pytest.mark.parametrize("success_on_restart, status", [(False, JobStatus.INTERRUPTED), (True, JobStatus.SUCCEEDED)])
def test_an_agent_killed_while_a_job_runs_reports_it_after_restart_and_never_reruns_it(
        start_agent, service, ran, groups_file, success_on_restart, status):
    agent = ready_agent(start_agent, service)
    service.publish_head("j1", job(ran, groups_file, "j1", "sleep 300"), **{Key.SUCCESS_ON_RESTART: success_on_restart})
    started = service.expect_status("j1", JobStatus.IN_PROGRESS)
    wait_until_running(ran, "j1")
    agent.stop(signal.SIGKILL)

    ready_agent(start_agent, service)
    final = service.expect_status("j1", status)
    assert final[Key.EXIT_CODE] is None
    assert final[Key.REASON].startswith("the agent restarted while the command ran")
    assert final[Key.START_TIME] == started[Key.START_TIME]
    assert runs(ran) == ["j1"]


LIVE_IN_GROUP_SCRIPT = """\
import sys
from pathlib import Path

pgid = sys.argv[1].encode()
live = []
for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
        fields = stat.read_bytes().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        continue
    if fields[0] not in (b"Z", b"X") and fields[2] == pgid:
        live.append(stat.parent.name)
print(" ".join(live))
"""


@pytest.mark.mosquitto
def test_a_command_left_running_by_a_killed_agent_is_stopped_before_the_next_job_runs(
        start_agent, service, ran, groups_file, tmp_path):
    agent = ready_agent(start_agent, service)
    service.publish_head("j1", job(ran, groups_file, "j1", "sleep 300"))
    service.expect_status("j1", JobStatus.IN_PROGRESS)
    wait_until_running(ran, "j1")
    pgid = int(groups_file.read_text())
    agent.wait_for_log(f"job j1: IN_PROGRESS; its command runs as process group {pgid}")
    agent.stop(signal.SIGKILL)
    assert pgid in live_group_members(pgid)  # the crash left the command running

    restarted = ready_agent(start_agent, service)
    final = service.expect_status("j1", JobStatus.INTERRUPTED)
    assert final[Key.REASON] == "the agent restarted while the command ran; its leftover processes were stopped"
    assert live_group_members(pgid) == []
    assert "stopped the leftover processes" in restarted.log()

    script, seen = tmp_path / "live_in_group.py", tmp_path / "seen-by-j2"
    script.write_text(LIVE_IN_GROUP_SCRIPT)
    service.publish_head("j2", job(ran, groups_file, "j2", f"{sys.executable} {script} {pgid} > {seen}"))
    service.expect_status("j2", JobStatus.IN_PROGRESS)
    service.expect_status("j2", JobStatus.SUCCEEDED)
    assert seen.read_text() == "\n"  # j2 found no live process of j1's group
    assert runs(ran) == ["j1", "j2"]


@pytest.mark.mosquitto
def test_a_leftover_command_is_stopped_even_when_the_head_moved_while_the_agent_was_away(
        start_agent, service, ran, groups_file):
    agent = ready_agent(start_agent, service)
    service.publish_head("j1", job(ran, groups_file, "j1", "sleep 300"))
    service.expect_status("j1", JobStatus.IN_PROGRESS)
    wait_until_running(ran, "j1")
    pgid = int(groups_file.read_text())
    agent.wait_for_log(f"job j1: IN_PROGRESS; its command runs as process group {pgid}")
    agent.stop(signal.SIGKILL)
    service.expect_presence(Presence.OFFLINE)
    service.publish_head("j2", job(ran, groups_file, "j2"))  # e.g. the service timed j1 out meanwhile

    restarted = ready_agent(start_agent, service)
    service.expect_status("j2", JobStatus.IN_PROGRESS)
    service.expect_status("j2", JobStatus.SUCCEEDED)
    assert live_group_members(pgid) == []
    log = restarted.log()
    assert log.index("stopped the leftover processes") < log.index("job j2: IN_PROGRESS")


@pytest.mark.mosquitto
def test_sigterm_kills_the_job_says_offline_exits_0_and_the_job_is_interrupted_after_restart(
        start_agent, service, ran, groups_file):
    agent = ready_agent(start_agent, service)
    service.publish_head("j1", job(ran, groups_file, "j1", "sleep 300"))
    service.expect_status("j1", JobStatus.IN_PROGRESS)
    wait_until_running(ran, "j1")

    assert agent.stop(signal.SIGTERM) == 0
    service.expect_presence(Presence.OFFLINE)
    assert live_group_members(int(groups_file.read_text())) == []
    assert service.statuses.empty()  # no CANCELED: the journal entry stays "started"

    ready_agent(start_agent, service)
    service.expect_status("j1", JobStatus.INTERRUPTED)
    assert runs(ran) == ["j1"]


def child_pids(agent: AgentProcess) -> list[int]:
    """The agent's child processes: between jobs, only a standby (the next job's shell) can be one."""
    tasks = Path(f"/proc/{agent.process.pid}/task")
    return [int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()]


def shells_waiting(agent: AgentProcess) -> int:
    return len(child_pids(agent))


def wait_for_shells(agent: AgentProcess, count: int) -> None:
    deadline = time.monotonic() + WAIT
    while shells_waiting(agent) != count:
        assert time.monotonic() < deadline, f"the agent never had {count} child process(es)"
        time.sleep(0.02)


@pytest.mark.mosquitto
def test_a_floor_that_only_follows_the_jobs_run_is_logged_at_debug_one_past_them_at_info(
        start_agent, service, ran, groups_file):
    """Every head after a job raises the Floor to that job: at INFO only a Floor that covers a job this
    agent never ran (canceled, deleted or ended by the service) says so, and the first one."""
    agent = start_agent("--log-level", "INFO")
    service.expect_presence(Presence.ONLINE)
    agent.wait_for_log("subscribed to")
    for name in ("j1", "j2"):  # j2's head carries Floor 1: j1, which this agent ran
        service.publish_head(name, job(ran, groups_file, name))
        service.expect_status(name, JobStatus.IN_PROGRESS)
        service.expect_status(name, JobStatus.SUCCEEDED)
    service.publish_signed({Key.DEVICE_ID: DEVICE, Key.FLOOR: 9, Key.ISSUED_AT: format_time(utc_now())})
    agent.wait_for_log("the idle head: the floor is now 9: no job at or below it ever runs here")
    assert "job 'j1': the floor is now 0" in agent.log()
    assert "the floor is now 1" not in agent.log()
    assert runs(ran) == ["j1", "j2"]


@pytest.mark.mosquitto
def test_after_each_job_the_next_jobs_shell_is_started_ahead_and_kept_while_the_agent_waits(
        start_agent, service, ran, groups_file):
    """After a job the agent starts the next job's shell (a Standby) and keeps it through the idle
    head: the next job runs in it whether a queue drains or it comes alone. Before its first job the
    agent has none (nor the runner loaded)."""
    agent = ready_agent(start_agent, service)
    assert shells_waiting(agent) == 0
    for name in ("j1", "j2"):  # a queue draining: j2 follows j1 without an idle head between
        service.publish_head(name, job(ran, groups_file, name))
        service.expect_status(name, JobStatus.IN_PROGRESS)
        service.expect_status(name, JobStatus.SUCCEEDED)
    wait_for_shells(agent, 1)
    service.clear_head()  # the queue is empty: the standby stays for the next job
    agent.wait_for_log("the idle head: the floor is now 2")
    time.sleep(0.3)
    assert shells_waiting(agent) == 1
    service.publish_head("j3", job(ran, groups_file, "j3"))  # a lone job
    service.expect_status("j3", JobStatus.IN_PROGRESS)
    service.expect_status("j3", JobStatus.SUCCEEDED)
    wait_for_shells(agent, 1)
    assert runs(ran) == ["j1", "j2", "j3"]
    ahead = [name for name in runs(ran) if f"job {name}: runs in the shell started ahead of it" in agent.log()]
    assert ahead == ["j2", "j3"], agent.log()
    standby = child_pids(agent)
    assert agent.stop(signal.SIGTERM) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in standby)  # dropped (and reaped) at the stop


@pytest.mark.mosquitto
def test_presence_is_online_on_connect_and_the_last_will_says_offline(start_agent, service):
    agent = start_agent()
    online = service.expect_presence(Presence.ONLINE)
    assert set(online) == {Key.PRESENCE, Key.TIME, Key.AGENT_VERSION} and online[Key.TIME].endswith("Z")

    agent.stop(signal.SIGKILL)  # no clean disconnect: the broker sends the will
    offline = service.expect_presence(Presence.OFFLINE)
    assert offline[Key.AGENT_VERSION] == online[Key.AGENT_VERSION]


@pytest.mark.mosquitto
def test_heads_queued_while_the_agent_was_away_are_not_run_only_the_current_one(
        start_agent, service, ran, groups_file):
    agent = ready_agent(start_agent, service)
    service.publish_head("j1", job(ran, groups_file, "j1"))
    service.expect_status("j1", JobStatus.IN_PROGRESS)
    service.expect_status("j1", JobStatus.SUCCEEDED)  # the agent's session now has its subscription
    agent.stop(signal.SIGKILL)
    service.expect_presence(Presence.OFFLINE)

    service.publish_head("j2", job(ran, groups_file, "j2"))  # queued for the offline session...
    service.publish_head("j3", job(ran, groups_file, "j3"))  # ...and superseded before it came back
    ready_agent(start_agent, service)

    service.expect_status("j3", JobStatus.IN_PROGRESS)
    service.expect_status("j3", JobStatus.SUCCEEDED)
    assert runs(ran) == ["j1", "j3"]


@pytest.mark.mosquitto
def test_bad_messages_are_ignored_and_the_agent_keeps_running(start_agent, service, ran, groups_file):
    agent = ready_agent(start_agent, service)
    service.publish_raw(b"not json")
    service.publish_raw(encode({Key.JOB_ID: "no-command"}))
    service.publish_head("huge", job(ran, groups_file, "huge", "#" + "x" * (300 * 1024)))
    service.publish_head("good", job(ran, groups_file, "good"))

    service.expect_status("good", JobStatus.IN_PROGRESS)
    service.expect_status("good", JobStatus.SUCCEEDED)
    assert runs(ran) == ["good"]
    assert agent.process.poll() is None
    assert agent.log().count("ignored a bad message") == 3


@pytest.mark.mosquitto
def test_the_first_connection_is_retried_until_the_broker_comes_up(broker, start_agent):
    broker.stop()
    agent = start_agent()
    agent.wait_for_log("could not connect")
    broker.start()
    service = Service(broker.port)
    try:
        service.expect_presence(Presence.ONLINE)
    finally:
        service.close()
    assert agent.process.poll() is None


@pytest.mark.mosquitto
def test_after_a_broker_restart_the_agent_reconnects_and_resends_instead_of_rerunning(
        broker, start_agent, ran, groups_file):
    service = Service(broker.port)
    try:
        ready_agent(start_agent, service)
        service.publish_head("j1", job(ran, groups_file, "j1"))
        service.expect_status("j1", JobStatus.IN_PROGRESS)
        final = service.expect_status("j1", JobStatus.SUCCEEDED)
    finally:
        service.close()

    broker.restart()  # retained heads are gone (no persistence): the service republishes them
    service = Service(broker.port)
    try:
        service.expect_presence(Presence.ONLINE)
        service.publish_head("j1", job(ran, groups_file, "j1"))
        assert service.next_status() == final
    finally:
        service.close()
    assert runs(ran) == ["j1"]


def test_untrusted_text_is_shown_quoted_and_capped():
    assert shown("j1") == "'j1'" and shown("a\nb\x1b") == "'a\\nb\\x1b'"
    assert shown("x" * 100) == "'" + "x" * 79 + "...[22 more characters]"


FORGED_LINE = "2024-05-01 12:00:00,000 INFO ota-agent: job j9: SUCCEEDED exit=0"


@pytest.mark.mosquitto
def test_text_from_unverified_heads_is_quoted_and_capped_in_the_log(start_agent, service, ran, groups_file):
    agent = ready_agent(start_agent, service)
    forged_id = "x\n" + FORGED_LINE + "\x1b[2J" + "A" * 5000
    service.publish_raw(encode({Key.JOB_ID: forged_id, Key.COMMAND: "true", Key.DEVICE_ID: DEVICE}))  # unsigned
    agent.wait_for_log("is not a job id")  # not the report format: ignored, never answered
    service.publish_raw(encode({Key.JOB_ID: "y" * 5000, Key.COMMAND: "true", Key.TIMEOUT_SECONDS: -1}))  # bad
    agent.wait_for_log("y" * 40)
    service.publish_head("good", job(ran, groups_file, "good"))
    service.expect_status("good", JobStatus.IN_PROGRESS)
    service.expect_status("good", JobStatus.SUCCEEDED)

    log = agent.log()
    assert FORGED_LINE not in log.splitlines() and not any(line.startswith("2024-05-01") for line in log.splitlines())
    assert "\x1b" not in log and "A" * 200 not in log and "y" * 100 not in log  # capped
    assert "x\\\\n2024-05-01 12:00:00,000 INFO" in log  # quoted: the line break shows as \n


@pytest.mark.mosquitto
def test_a_refused_password_is_explained_once_and_retried_ever_slower(tmp_path):
    empty = tmp_path / "passwords"  # no account at all: the broker refuses every login
    empty.write_text("")
    empty.chmod(0o600)
    with start_mosquitto(tmp_path, ["allow_anonymous false", f"password_file {empty}"]) as broker:
        agent = AgentProcess(broker.port, tmp_path / "state", tmp_path / "agent.log", "--password", "wrong")
        try:
            deadline = time.monotonic() + WAIT
            while agent.log().count("refused the connection") < 3:
                assert time.monotonic() < deadline, f"fewer than 3 refusals:\n{agent.log()}"
                time.sleep(0.05)
        finally:
            agent.stop()
    log = agent.log()
    delays = [int(d) for d in re.findall(r"refused the connection: .*; retrying in (\d+) s", log)]
    assert delays[:3] == [1, 2, 4], log
    assert log.count(f"POST /v1/device/{DEVICE}/credentials") == 1, log
    assert log.index("retrying in 1 s") < log.index("POST /v1/device/") < log.index("retrying in 2 s")


def test_the_wait_after_refused_credentials_doubles_up_to_5_minutes():
    assert [link.credentials_retry_delay(n) for n in (1, 2, 3, 9, 10, 11, 1000)] == [1, 2, 4, 256, 300, 300, 300]



@pytest.mark.mosquitto
def test_an_agent_that_hears_no_signed_head_says_it_may_be_on_the_wrong_broker(start_agent, broker):
    agent = start_agent("--head-wait", "0.5")  # a bare broker: nobody publishes this device's head
    agent.wait_for_log("no head signed by the service's key came within 0.5 s on ota/v1/devices/")
    assert "this broker may not be the ota-bridge service's" in agent.log()
    assert f"connected to mqtt://127.0.0.1:{broker.port}, but no head signed" in agent.log()


@pytest.mark.mosquitto
def test_each_job_is_logged_with_its_parent_name_and_first_command_line(start_agent, service, ran, groups_file):
    service.publish_head("job-1", job(ran, groups_file, "one", "sleep 1") + "\n: second line")
    agent = start_agent("--head-wait", "0.5")
    service.expect_status("job-1", JobStatus.IN_PROGRESS)
    service.expect_status("job-1", JobStatus.SUCCEEDED)
    lines = [line for line in agent.log().splitlines() if "job job-1:" in line or "job 'job-1'" in line]
    about = "parent job 'parent', name 'test' (unsigned labels); command 'echo $$"
    assert any("IN_PROGRESS; its command runs as process group " in line and "; " + about in line
               and "(+1 more lines)" in line for line in lines), lines
    assert any("SUCCEEDED exit=0; " + about in line for line in lines), lines
    assert "no head signed" not in agent.log()  # the signed head came before the wait was over


@pytest.mark.mosquitto
def test_a_retry_runs_the_same_seq_again_and_a_replayed_first_attempt_does_not(
        start_agent, service, ran, groups_file):
    ready_agent(start_agent, service)
    service.publish_head("j1", job(ran, groups_file, "j1", "exit 3"))
    service.expect_status("j1", JobStatus.IN_PROGRESS)
    first = service.expect_status("j1", JobStatus.FAILED)
    assert Key.ATTEMPT not in first

    service.publish_head("j1", job(ran, groups_file, "j1", "exit 3"), **{Key.ATTEMPT: 2})  # same Seq, signed v3
    assert service.expect_status("j1", JobStatus.IN_PROGRESS)[Key.ATTEMPT] == 2
    second = service.expect_status("j1", JobStatus.FAILED)
    assert second[Key.ATTEMPT] == 2 and runs(ran) == ["j1", "j1"]

    service.publish_head("j1", job(ran, groups_file, "j1", "exit 3"))  # attempt 1 replayed: its result again
    assert service.next_status() == first
    service.publish_head("j1", job(ran, groups_file, "j1", "exit 3"), **{Key.ATTEMPT: 2})
    assert service.next_status() == second
    assert runs(ran) == ["j1", "j1"]


@pytest.mark.mosquitto
def test_the_next_attempt_of_the_running_job_cancels_it_and_runs(start_agent, service, ran, groups_file):
    """The service timed a silent attempt out and retries it: the head of attempt 2 has the same Seq."""
    ready_agent(start_agent, service)
    service.publish_head("j1", job(ran, groups_file, "j1", "sleep 300"))
    service.expect_status("j1", JobStatus.IN_PROGRESS)
    wait_until_running(ran, "j1")
    service.publish_head("j1", job(ran, groups_file, "j1", "sleep 300"))  # attempt 1 again: a duplicate
    service.publish_head("j1", job(ran, groups_file, "j1"), **{Key.ATTEMPT: 2})

    canceled = service.expect_status("j1", JobStatus.CANCELED)
    assert Key.ATTEMPT not in canceled  # about attempt 1
    assert service.expect_status("j1", JobStatus.IN_PROGRESS)[Key.ATTEMPT] == 2
    assert service.expect_status("j1", JobStatus.SUCCEEDED)[Key.ATTEMPT] == 2
    assert runs(ran) == ["j1", "j1"]
