"""ota-agent: run the jobs the ota-bridge service sends to this device, one at a time.

    ota-agent --broker mqtt://HOST:PORT --device-id ID --server-key-file FILE [--password-file FILE] ...
    ota-agent --broker mqtts://HOST:PORT [--ca-file FILE] [--cert-file FILE --key-file FILE] ...

Over mqtts:// (TLS 1.2 or later) the broker's certificate must chain to --ca-file (default: the
system's CAs) and name the broker's host; there is no way to turn that check off.

Every flag can also come from an environment variable OTA_AGENT_<FLAG> (e.g.
OTA_AGENT_DEVICE_ID); a flag wins over its variable. A missing or bad value exits 2.
Commands run through /bin/sh with the agent's environment minus those OTA_AGENT_* variables,
plus OTA_DEVICE_ID and OTA_JOB_ID.

Before anything about a head is journalled or run, the agent checks it, in this order: it is
signed, its signature verifies with the service's key (--server-key-file), it is for this
device, it is not older than a job this device already ran (its Seq), and its command is
inside the local policy (agent/policy.py). A head that fails is REJECTED with the reason,
and nothing runs.

Threads: paho's network thread only turns callbacks into events on a bounded queue; the main
thread reads that queue, decides, writes the journal and publishes; one worker thread runs
the current command (and journals its process group as it starts). At start-up, before it
connects, the agent kills any command an earlier agent left running (Agent.stop_leftovers).
Stale heads the broker queued for this persistent session while the agent was away arrive
before the SUBACK, so the agent acts on a head only once its subscription is acknowledged and
SUBSCRIBE_SETTLE_SECONDS have passed: by then the retained head, the current truth, has
replaced them.
"""

from __future__ import annotations

import argparse
import base64
import functools
import logging
import os
import queue
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Union
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from . import job_signature, protocol
from .journal import Entry, Journal, JournalError
from .policy import CommandPolicy, prefix_is_usable
from .protocol import JobStatus, Key, MessageError, Presence, Topics
from .runner import ProcessGroup, RunLimits, Runner, RunResult, in_progress_message, stop_leftovers

log = logging.getLogger("ota-agent")

ENV_PREFIX = "OTA_AGENT_"
HEAD_MAX_BYTES = 256 * 1024
# Reasons of a REJECTED job, besides the signature's (job_signature) and "the job is for device X".
STALE = "the job is older than one this device already ran"
OUTSIDE_POLICY = "the command is outside this device's policy"
SUBSCRIBE_SETTLE_SECONDS = 0.5
SYSTEM_STATE_DIR = Path("/var/lib/ota-agent")
EVENT_QUEUE_SIZE = 1000
_POLL_SECONDS = 0.1
DEFAULT_KILL_GRACE = 5.0
# Set for every command, on top of the agent's environment (minus its own OTA_AGENT_* settings).
COMMAND_ENV_DEVICE_ID = "OTA_DEVICE_ID"
COMMAND_ENV_JOB_ID = "OTA_JOB_ID"
_SHUTDOWN_PUBLISH_SECONDS = 3.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@functools.cache
def agent_version() -> str:
    try:
        return metadata.version("ota-bridge")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# --- settings -------------------------------------------------------------------------------


class SettingsError(Exception):
    """A flag (or its environment variable) is missing or bad."""

    def __init__(self, dest: str, problem: str) -> None:
        flag = "--" + dest.replace("_", "-")
        super().__init__(f"{flag} (or {env_name(dest)}) {problem}")
        self.flag = flag


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


@dataclass(frozen=True)
class Settings:
    broker_host: str
    broker_port: int
    device_id: str
    username: str
    password: str | None = field(repr=False)
    state_dir: Path
    prefix: str
    output_cap: int
    default_timeout: int
    kill_grace: float
    log_level: str
    server_key: bytes  # the service's Ed25519 public key, raw: every head must be signed with it
    policy: CommandPolicy = CommandPolicy()
    tls: ssl.SSLContext | None = field(default=None, repr=False, compare=False)  # None: plain mqtt://

    @property
    def server_key_b64(self) -> str:
        return base64.b64encode(self.server_key).decode("ascii")

    @property
    def broker_url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.broker_host}:{self.broker_port}"

    @property
    def journal_dir(self) -> Path:
        return self.state_dir / self.device_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ota-agent",
        description="Run the jobs the ota-bridge service sends to this device. "
        f"Every flag also reads {ENV_PREFIX}<FLAG> from the environment (e.g. {env_name('device_id')}).",
    )
    add = parser.add_argument
    add("--broker", metavar="mqtt[s]://HOST:PORT", help="the MQTT broker: mqtt://HOST:PORT (default port 1883; "
        "HOST:PORT also accepted) or, over TLS, mqtts://HOST:PORT (default port 8883)")
    add("--ca-file", metavar="FILE", help="mqtts:// only: PEM CA certificates the broker's certificate must chain "
        "to (default: the system's CAs); the certificate must also name the broker's host")
    add("--cert-file", metavar="FILE", help="mqtts:// only: a PEM client certificate, for a broker that asks "
        "for one (with --key-file)")
    add("--key-file", metavar="FILE", help="the unencrypted PEM private key of --cert-file")
    add("--device-id", metavar="ID", help="this device's id; also the MQTT client id")
    add("--username", help="MQTT user name (default: the device id)")
    add("--password", help="MQTT password (prefer --password-file)")
    add("--password-file", metavar="FILE", help="a file holding the MQTT password")
    add("--state-dir", metavar="DIR", help=f"where the journal lives (default {SYSTEM_STATE_DIR} "
        "when writable, else ~/.local/state/ota-agent); one subdirectory per device id")
    add("--prefix", help=f"topic prefix (default {protocol.DEFAULT_PREFIX})")
    add("--output-cap", metavar="BYTES", help=f"bytes of stdout/stderr kept per stream, the tail "
        f"(default {protocol.OUTPUT_CAP_BYTES})")
    add("--default-timeout", metavar="SECONDS", help="timeout of a job whose head has no TimeoutSeconds "
        f"(default {protocol.DEFAULT_TIMEOUT_SECONDS})")
    add("--kill-grace", metavar="SECONDS", help="how long a killed command's process group gets between "
        f"SIGTERM and SIGKILL (default {DEFAULT_KILL_GRACE:g})")
    add("--log-level", metavar="LEVEL", help=f"one of {', '.join(LOG_LEVELS)} (default INFO)")
    add("--server-key", metavar="BASE64", help="the service's job-signing public key (prefer --server-key-file)")
    add("--server-key-file", metavar="FILE", help="a file holding the service's job-signing public key: "
        "the service's <data-dir>/job-signing.pub, or PublicKey from its GET /v1/signing-key (required)")
    add("--allow-prefix", metavar="PREFIX", action="append", help="run only commands that are PREFIX or start "
        "with PREFIX and a blank, and hold no shell special character (repeatable; "
        f"{env_name('allow_prefix')} takes a comma- or newline-separated list)")
    add("--allow-scripts-dir", metavar="DIR", help="run only commands that are the absolute path of a script "
        "inside DIR, with plain-word arguments (with both --allow-* flags, a command must match one)")
    add("--version", action="version", version=f"ota-agent {agent_version()}")
    return parser


_SETTING_NAMES = (
    "broker", "device_id", "username", "password", "password_file", "state_dir", "prefix",
    "output_cap", "default_timeout", "kill_grace", "log_level", "server_key", "server_key_file",
    "allow_scripts_dir", "ca_file", "cert_file", "key_file",
)
_LIST_SETTING_NAMES = ("allow_prefix",)  # repeatable flags; their variable holds a list


def load_settings(argv: list[str] | None, environ: Mapping[str, str]) -> Settings:
    """Settings from flags, then OTA_AGENT_* variables, then defaults. Raises SettingsError."""
    args = build_parser().parse_args(_join_values(sys.argv[1:] if argv is None else argv))
    raw = {name: _flag_or_env(getattr(args, name), environ.get(env_name(name))) for name in _SETTING_NAMES}
    host, port, tls = parse_broker(_required(raw, "broker"))
    device_id = _device_id(_required(raw, "device_id"))
    return Settings(
        broker_host=host,
        broker_port=port,
        device_id=device_id,
        username=raw["username"] or device_id,
        password=_password(raw["password"], raw["password_file"]),
        state_dir=Path(raw["state_dir"]) if raw["state_dir"] else default_state_dir(),
        prefix=_prefix(raw["prefix"] or protocol.DEFAULT_PREFIX),
        output_cap=_positive_int(raw, "output_cap", protocol.OUTPUT_CAP_BYTES),
        default_timeout=_positive_int(raw, "default_timeout", protocol.DEFAULT_TIMEOUT_SECONDS),
        kill_grace=_positive_number(raw, "kill_grace", DEFAULT_KILL_GRACE),
        log_level=_log_level(raw["log_level"] or "INFO"),
        server_key=_server_key(raw["server_key"], raw["server_key_file"]),
        policy=CommandPolicy(
            allow_prefixes=_allow_prefixes(args.allow_prefix, environ.get(env_name("allow_prefix"))),
            scripts_dir=_scripts_dir(raw["allow_scripts_dir"]),
        ),
        tls=_broker_tls(raw, tls),
    )


def _join_values(argv: list[str]) -> list[str]:
    """Turn `--flag VALUE` into `--flag=VALUE`, so a value may start with '-' (e.g. a password)."""
    takes_value = {"--" + name.replace("_", "-") for name in (*_SETTING_NAMES, *_LIST_SETTING_NAMES)}
    joined: list[str] = []
    pending: str | None = None
    for arg in argv:
        if pending is not None:
            joined.append(f"{pending}={arg}")
            pending = None
        elif arg in takes_value:
            pending = arg
        else:
            joined.append(arg)
    return joined + ([pending] if pending else [])


def _flag_or_env(flag: str | None, env: str | None) -> str | None:
    if flag is not None:
        return flag
    return env or None  # an empty variable counts as unset


def _required(raw: dict[str, str | None], name: str) -> str:
    value = raw[name]
    if value is None:
        raise SettingsError(name, "is required")
    return value


DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def parse_broker(value: str) -> tuple[str, int, bool]:
    """mqtt://HOST:PORT, HOST:PORT (port 1883 when left out) or mqtts://HOST:PORT (8883) -> (host, port, tls)."""
    url = urlsplit(value if "://" in value else f"mqtt://{value}")
    if url.scheme not in DEFAULT_PORTS or not url.hostname or url.path not in ("", "/") or url.query or url.username:
        raise SettingsError("broker", f"is {value!r}, expected mqtt://HOST:PORT or mqtts://HOST:PORT")
    try:
        port = DEFAULT_PORTS[url.scheme] if url.port is None else url.port
    except ValueError as e:
        raise SettingsError("broker", f"is {value!r}: bad port ({e})") from e
    if port == 0:
        raise SettingsError("broker", f"is {value!r}: port 0 is not a port to connect to")
    return url.hostname, port, url.scheme == "mqtts"


def _broker_tls(raw: dict[str, str | None], tls: bool) -> ssl.SSLContext | None:
    """The TLS context for an mqtts:// broker; None for mqtt://, which takes no TLS files."""
    if tls:
        return tls_context(raw)
    for name in ("ca_file", "cert_file", "key_file"):
        if raw[name] is not None:
            raise SettingsError(name, "is for a TLS broker: give --broker mqtts://HOST:PORT")
    return None


def tls_context(raw: dict[str, str | None]) -> ssl.SSLContext:
    """TLS 1.2 or later; the broker's certificate must chain to --ca-file (or the system's CAs) and name its host."""
    cafile = _readable(raw, "ca_file")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except ssl.SSLError as e:
        raise SettingsError("ca_file", f"names a file with no usable PEM CA certificate: {e}") from e
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if (raw["cert_file"] is None) != (raw["key_file"] is None):
        raise SettingsError("cert_file", "and --key-file go together: give both, or neither")
    cert_file, key_file = _readable(raw, "cert_file"), _readable(raw, "key_file")
    if cert_file is not None and key_file is not None:
        _load_client_certificate(context, cert_file, key_file)
    return context


def _load_client_certificate(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    def encrypted() -> bytes:  # instead of OpenSSL asking for a passphrase on the terminal
        raise SettingsError("key_file", "names an encrypted key; give an unencrypted one")

    try:
        context.load_cert_chain(cert_file, key_file, password=encrypted)
    except ssl.SSLError as e:
        raise SettingsError("cert_file", f"and --key-file are not a PEM certificate and its private key ({e})") from e


def _readable(raw: dict[str, str | None], name: str) -> str | None:
    path = raw[name]
    if path is not None:
        try:
            Path(path).open("rb").close()
        except OSError as e:
            raise SettingsError(name, f"names a file that cannot be read: {e}") from e
    return path


def _device_id(value: str) -> str:
    if not protocol.is_valid_device_id(value):
        raise SettingsError("device_id", f"is {value!r}, which does not match {protocol.DEVICE_ID_PATTERN}")
    return value


def _password(password: str | None, password_file: str | None) -> str | None:
    if password is not None and password_file is not None:
        raise SettingsError("password", "and --password-file are both set; give one")
    if password_file is None:
        return password
    try:
        return Path(password_file).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError("password_file", f"names a file that cannot be read: {e}") from e


def _server_key(key: str | None, key_file: str | None) -> bytes:
    """The service's public key; the agent does not start without one."""
    if key is not None and key_file is not None:
        raise SettingsError("server_key", "and --server-key-file are both set; give one")
    if key is None and key_file is None:
        raise SettingsError("server_key_file", "is required (or --server-key): the agent runs only jobs the "
                            f"service signed; {job_signature.WHERE_TO_GET_THE_KEY}")
    name, text = ("server_key", key) if key is not None else ("server_key_file", None)
    if text is None:
        try:
            text = Path(str(key_file)).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SettingsError(name, f"names a file that cannot be read: {e}") from e
    try:
        return job_signature.parse_public_key(text)
    except ValueError as e:
        raise SettingsError(name, f"is bad: the key {e}; {job_signature.WHERE_TO_GET_THE_KEY}") from e


def _allow_prefixes(flags: list[str] | None, env: str | None) -> tuple[str, ...]:
    """--allow-prefix values, or the variable's comma- or newline-separated list; blanks trimmed."""
    if flags is not None:
        values = [value.strip() for value in flags]
        if not all(values):
            raise SettingsError("allow_prefix", "is empty; give the start of the commands to allow")
    else:
        values = [value.strip() for value in (env or "").replace("\n", ",").split(",") if value.strip()]
    for value in values:
        if not prefix_is_usable(value):
            raise SettingsError("allow_prefix", f"is {value!r}, which holds a shell special or control character; no "
                                "command with one is ever allowed by prefix (use --allow-scripts-dir)")
    return tuple(values)


def _scripts_dir(value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if not path.is_absolute() or not path.is_dir():
        raise SettingsError("allow_scripts_dir", f"is {value!r}, expected the absolute path of a directory")
    return path


def _prefix(value: str) -> str:
    try:
        return Topics(value).prefix
    except ValueError as e:
        raise SettingsError("prefix", f"is bad: {e}") from e


def _positive_int(raw: dict[str, str | None], name: str, default: int) -> int:
    value = raw[name]
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise SettingsError(name, f"is {value!r}, expected a whole number above 0")
    return number


def _positive_number(raw: dict[str, str | None], name: str, default: float) -> float:
    value = raw[name]
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not 0 < number < float("inf"):
        raise SettingsError(name, f"is {value!r}, expected a number of seconds above 0")
    return number


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise SettingsError("log_level", f"is {value!r}, expected one of {', '.join(LOG_LEVELS)}")
    return value.upper()


def default_state_dir() -> Path:
    """The system state dir when this user may write it, else one in the user's home."""
    probe = SYSTEM_STATE_DIR if SYSTEM_STATE_DIR.exists() else SYSTEM_STATE_DIR.parent
    if os.access(probe, os.W_OK):
        return SYSTEM_STATE_DIR
    return Path.home() / ".local" / "state" / "ota-agent"


# --- the head of the queue ------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """The job the service wants this device to run next."""

    job_id: str
    command: str
    timeout_seconds: float
    success_on_restart: bool
    seq: int | None
    device_id: Any = None  # the head's DeviceId, checked only once its signature verifies
    signature: Any = None  # the head's Signature, as it came
    signed_content: bytes | None = field(default=None, repr=False)  # what the signature must sign


def parse_head(payload: bytes, default_timeout: float) -> Head | None:
    """The head in a job-topic payload; None when the payload is empty (queue empty).

    Raises MessageError for anything that is not a head at all. Whose head it is, and whether
    the service signed it, is for the agent to check before it acts on it.
    """
    if not payload:
        return None
    message = protocol.decode(payload, HEAD_MAX_BYTES)
    job_id, command = message.get(Key.JOB_ID), message.get(Key.COMMAND)
    if not isinstance(job_id, str) or not job_id:
        raise MessageError(f"{Key.JOB_ID} is missing or not a string")
    if not isinstance(command, str) or not command:
        raise MessageError(f"job {job_id}: {Key.COMMAND} is missing or not a string")
    seq = message.get(Key.SEQ)
    return Head(
        job_id=job_id,
        command=command,
        timeout_seconds=_timeout(message.get(Key.TIMEOUT_SECONDS), job_id, default_timeout),
        success_on_restart=message.get(Key.SUCCESS_ON_RESTART) is True,
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        device_id=message.get(Key.DEVICE_ID),
        signature=message.get(Key.SIGNATURE),
        signed_content=job_signature.signed_content(message),
    )


def _timeout(value: Any, job_id: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise MessageError(f"job {job_id}: {Key.TIMEOUT_SECONDS} is {value!r}, expected a number above 0")
    return float(value)


# --- events from paho's thread and the worker -----------------------------------------------


@dataclass(frozen=True)
class Connected:
    refused: str | None  # the broker's reason when it refused the connection


@dataclass(frozen=True)
class ConnectFailed:
    reason: str  # the network or TLS error, e.g. the broker's certificate did not verify


@dataclass(frozen=True)
class Disconnected:
    reason: str


@dataclass(frozen=True)
class Subscribed:
    refused: str | None


@dataclass(frozen=True)
class JobMessage:
    topic: str
    payload: bytes


@dataclass(frozen=True)
class JobDone:
    result: RunResult


Event = Union[Connected, ConnectFailed, Disconnected, Subscribed, JobMessage, JobDone]


# --- the broker -----------------------------------------------------------------------------


def _not_reconnect_noise(record: logging.LogRecord) -> bool:
    """Drops the error paho logs after every failed reconnect: the agent logs those itself."""
    return not str(record.msg).startswith("Client is not connected")


class BrokerLink:
    """The one place that talks to the MQTT broker. Callbacks only queue events."""

    def __init__(self, settings: Settings, events: queue.Queue[Event]) -> None:
        self.settings = settings
        self.topics = Topics(settings.prefix)
        self.events = events
        self.client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=s.device_id, clean_session=False, protocol=mqtt.MQTTv311
        )
        client.username_pw_set(s.username, s.password)
        if s.tls is not None:
            client.tls_set_context(s.tls)
        paho_log = log.getChild("mqtt")  # paho's errors, e.g. the broker refusing our TLS certificate
        paho_log.addFilter(_not_reconnect_noise)
        client.enable_logger(paho_log)
        will = protocol.encode(presence_message(Presence.OFFLINE))
        client.will_set(self.topics.presence(s.device_id), will, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = lambda c, u, flags, code, props: self._offer(
            Connected(str(code) if code.is_failure else None))
        # paho calls on_connect_fail while it handles the OSError (a TLS failure is one): keep its text.
        client.on_connect_fail = lambda c, u: self._offer(ConnectFailed(str(sys.exc_info()[1])))
        client.on_disconnect = lambda c, u, flags, code, props: self._offer(Disconnected(str(code)))
        client.on_subscribe = lambda c, u, mid, codes, props: self._offer(Subscribed(_refusal(codes)))
        client.on_message = lambda c, u, msg: self._offer(JobMessage(msg.topic, bytes(msg.payload)))
        return client

    def _offer(self, event: Event) -> None:
        try:
            self.events.put_nowait(event)
        except queue.Full:
            log.warning("event queue full; dropped %s", type(event).__name__)

    def start(self) -> None:
        """Connect in the background; the first connection also retries while the broker is down."""
        self.client.connect_async(self.settings.broker_host, self.settings.broker_port, keepalive=60)
        self.client.loop_start()

    def subscribe_job(self) -> None:
        self.client.subscribe(self.job_topic, qos=1)

    @property
    def job_topic(self) -> str:
        return self.topics.job(self.settings.device_id)

    def publish_status(self, message: dict[str, Any]) -> None:
        self._publish(self.topics.status(self.settings.device_id), message, retain=False)

    def publish_presence(self, presence: Presence) -> mqtt.MQTTMessageInfo:
        return self._publish(self.topics.presence(self.settings.device_id), presence_message(presence), retain=True)

    def _publish(self, topic: str, message: dict[str, Any], retain: bool) -> mqtt.MQTTMessageInfo:
        """Publish QoS 1 without waiting; paho queues it while offline."""
        info = self.client.publish(topic, protocol.encode(message), qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("could not queue a message for %s: %s", topic, mqtt.error_string(info.rc))
        return info

    def stop(self) -> None:
        """Say offline (when connected), disconnect cleanly, stop paho's thread."""
        info = self.publish_presence(Presence.OFFLINE)
        try:
            info.wait_for_publish(timeout=_SHUTDOWN_PUBLISH_SECONDS)
        except (RuntimeError, ValueError) as e:
            log.info("could not publish presence offline (%s); the broker's last will says it", e)
        self.client.disconnect()
        self.client.loop_stop()


def _refusal(codes: list[Any]) -> str | None:
    refused = [str(code) for code in codes if code.is_failure]
    return ", ".join(refused) or None


def presence_message(presence: Presence) -> dict[str, Any]:
    return {
        Key.PRESENCE: presence.value,
        Key.TIME: protocol.format_time(protocol.utc_now()),
        Key.AGENT_VERSION: agent_version(),
    }


# --- the agent ------------------------------------------------------------------------------


@dataclass
class _Running:
    head: Head
    runner: Runner
    thread: threading.Thread
    canceling: bool = False


class Agent:
    """The main loop: reads events, keeps the latest head, runs one job at a time."""

    def __init__(self, settings: Settings, journal: Journal, environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.journal = journal
        self.command_env = command_environment(environ, settings.device_id)
        self.events: queue.Queue[Event] = queue.Queue(maxsize=EVENT_QUEUE_SIZE)
        self.link = BrokerLink(settings, self.events)
        self.stop_signal: int | None = None
        self._head: Head | None = None  # the latest head received; None: the queue is empty
        self._head_new = False  # a head arrived that the loop has not acted on yet
        self._ready_at: float | None = None  # when heads may be acted on (None: not subscribed)
        self._running: _Running | None = None
        self._unjournaled: set[str] = set()  # jobs refused because the journal could not be written
        self._connect_failures = 0
        self._checked: tuple[Head, str | None] | None = None  # the last head whose signature was checked

    def request_stop(self, signum: int, frame: Any = None) -> None:
        """Signal handler: only sets a flag, the main loop notices it."""
        self.stop_signal = signum

    def run(self) -> int:
        log.info("agent %s for device %s, broker %s, journal %s", agent_version(),
                 self.settings.device_id, self.settings.broker_url, self.journal.path)
        log.info("runs only jobs signed by the service key %s; %s", self.settings.server_key_b64,
                 self.settings.policy.describe())
        self.stop_leftovers()
        self.link.start()
        try:
            while self.stop_signal is None:
                self._step()
        finally:
            self._shutdown()
        return 0

    def stop_leftovers(self) -> None:
        """End the commands a dead agent left running, before anything is run or reported.

        A journal entry "started" without a result names its command's process group; one that
        still runs (the same boot, the same leader: ProcessGroup.still_running) is killed like a
        canceled command, and the entry is marked so that its INTERRUPTED Reason says so.
        Without /proc no group is journalled, and a leftover command runs on.
        """
        for entry in self.journal.entries():
            if entry.result is None and entry.process is not None:
                self._stop_leftover(entry.job_id, entry.process)

    def _stop_leftover(self, job_id: str, group: ProcessGroup) -> None:
        log.info("job %s: checking whether its command (process group %d) outlived the last agent",
                 job_id, group.pgid)
        if not stop_leftovers(group, self.settings.kill_grace):
            return
        log.warning("job %s: stopped the leftover processes of its command (process group %d), which "
                    "still ran after the agent restarted", job_id, group.pgid)
        try:
            self.journal.record_leftovers_stopped(job_id)
        except JournalError as e:
            log.error("job %s: %s", job_id, e)

    def _step(self) -> None:
        try:
            self._handle(self.events.get(timeout=_POLL_SECONDS))
            while True:  # take every event already waiting, so a burst of heads coalesces
                self._handle(self.events.get_nowait())
        except queue.Empty:
            pass
        self._act_on_head()

    def _handle(self, event: Event) -> None:
        if isinstance(event, JobMessage):
            self._on_job_message(event)
        elif isinstance(event, JobDone):
            self._on_job_done(event.result)
        elif isinstance(event, Connected):
            self._on_connected(event)
        elif isinstance(event, Subscribed):
            self._on_subscribed(event)
        elif isinstance(event, ConnectFailed):
            self._connect_failures += 1
            log.warning("could not connect to %s (attempt %d: %s); retrying", self.settings.broker_url,
                        self._connect_failures, event.reason)
        elif isinstance(event, Disconnected):
            self._ready_at = None
            log.warning("disconnected from %s (%s); reconnecting", self.settings.broker_url, event.reason)

    # --- connection -------------------------------------------------------------------------

    def _on_connected(self, event: Connected) -> None:
        if event.refused:
            log.error("broker %s refused the connection: %s", self.settings.broker_url, event.refused)
            return
        self._connect_failures = 0
        self._ready_at = None
        log.info("connected to %s", self.settings.broker_url)
        self.link.publish_presence(Presence.ONLINE)
        self.link.subscribe_job()

    def _on_subscribed(self, event: Subscribed) -> None:
        if event.refused:
            log.error("broker refused the subscription to %s: %s", self.link.job_topic, event.refused)
            return
        log.info("subscribed to %s", self.link.job_topic)
        self._ready_at = time.monotonic() + SUBSCRIBE_SETTLE_SECONDS

    def _on_job_message(self, event: JobMessage) -> None:
        if event.topic != self.link.job_topic:
            log.warning("ignored a message on unexpected topic %s", event.topic)
            return
        try:
            head = parse_head(event.payload, self.settings.default_timeout)
        except MessageError as e:
            log.warning("ignored a bad message on %s: %s", event.topic, e)
            return
        self._head, self._head_new = head, True

    # --- heads ------------------------------------------------------------------------------

    def _act_on_head(self) -> None:
        if not self._head_new or self._ready_at is None or time.monotonic() < self._ready_at:
            return
        if self._running is not None:
            self._supersede(self._running, self._head)
            return
        self._head_new = False
        if self._head is not None:
            self._take(self._head)

    def _supersede(self, running: _Running, head: Head | None) -> None:
        """A head arrived while a job runs: a duplicate is ignored, and so is one that cannot be
        the service's next job (unsigned, forged, another device's, not newer); anything else
        cancels the running job."""
        if head is not None and head.job_id == running.head.job_id:
            self._head_new = False  # the same head delivered again
            return
        if head is not None and (problem := self._why_not_next(head, running.head)):
            log.warning("job %s: ignored head %s while the command runs: %s", running.head.job_id,
                        head.job_id, problem)
            self._head_new = False
            return
        if running.canceling:
            return  # the new head is taken once the canceled job is done
        running.canceling = True
        reason = (f"the head moved to job {head.job_id} while the command ran" if head
                  else "the job queue was cleared while the command ran")
        log.info("job %s: canceling: %s", running.head.job_id, reason)
        running.runner.cancel(reason)

    def _take(self, head: Head) -> None:
        """Run a new head, or resend what the journal knows about it, or reject it.

        Never run a job twice, nor one the service did not sign for this device. A head that
        is not signed by the service never changes or resends what the journal holds.
        """
        if head.job_id in self._unjournaled:
            return
        entry = self.journal.get(head.job_id)
        unsigned = self._signature_problem(head)
        if unsigned is not None and entry is not None:
            log.warning("job %s: ignored a head naming it: %s; the journal's result stands", head.job_id, unsigned)
        elif unsigned is not None:
            self._reject(head, unsigned, journal=False)
        elif entry is not None:
            self._resend(head, entry)
        elif (reason := self._rejection(head)) is not None:
            self._reject(head, reason, journal=reason == OUTSIDE_POLICY)
        else:
            self._start(head)

    def _signature_problem(self, head: Head) -> str | None:
        """None when the service signed this head; each head received is verified once."""
        if self._checked is None or self._checked[0] is not head:
            problem = job_signature.signature_problem(head.signature, head.signed_content, self.settings.server_key)
            self._checked = (head, problem)
        return self._checked[1]

    def _rejection(self, head: Head) -> str | None:
        """Why a head the service signed must not run here; None when it may."""
        if head.device_id != self.settings.device_id:
            return f"the job is for device {head.device_id}"
        highest = self.journal.highest_seq
        if highest is not None and head.seq is not None and head.seq < highest:
            return STALE
        if not self.settings.policy.allows(head.command):
            return OUTSIDE_POLICY
        return None

    def _why_not_next(self, head: Head, running: Head) -> str | None:
        """Why a head cannot be the service's job after the running one; None when it can."""
        problem = self._signature_problem(head)
        if problem is None and head.device_id != self.settings.device_id:
            problem = f"the job is for device {head.device_id}"
        if problem is None and (head.seq is None or running.seq is None or head.seq <= running.seq):
            problem = "it is not newer than the running job"
        return problem

    def _reject(self, head: Head, reason: str, journal: bool) -> None:
        """Report the head REJECTED; nothing runs.

        Only a refusal by the local policy is journalled (with the head's Seq): every other
        reason holds again whenever the head comes back, and journalling heads a forger or a
        replayer chose would let them push real entries out of the journal.
        """
        log.warning("job %s: %s: %s", head.job_id, JobStatus.REJECTED.value, reason)
        message = RunResult.without_output(head.job_id, JobStatus.REJECTED, protocol.utc_now(), reason).status_message()
        if journal:
            try:
                self.journal.record_result(head.job_id, message, seq=head.seq)
            except JournalError as e:
                log.error("job %s: %s; publishing the rejection anyway", head.job_id, e)
        self.link.publish_status(message)

    def _resend(self, head: Head, entry: Entry) -> None:
        result = entry.result
        if result is None:
            result = RunResult.interrupted(head.job_id, entry.start_datetime, head.success_on_restart,
                                           entry.leftovers_stopped).status_message()
            self._record_result(head.job_id, result)
        log.info("job %s: %s (resent from the journal)", head.job_id, result.get(Key.STATUS))
        self.link.publish_status(result)

    def _start(self, head: Head) -> None:
        limits = RunLimits(timeout_seconds=head.timeout_seconds, output_cap=self.settings.output_cap,
                           kill_grace=self.settings.kill_grace)
        runner = Runner(head.job_id, head.command, limits, {**self.command_env, COMMAND_ENV_JOB_ID: head.job_id},
                        on_started=functools.partial(self._record_process, head.job_id))
        try:
            self.journal.record_started(head.job_id, head.seq, runner.start_time)
        except JournalError as e:
            self._refuse(head, str(e))
            return
        log.info("job %s: %s", head.job_id, JobStatus.IN_PROGRESS.value)
        self.link.publish_status(in_progress_message(head.job_id, runner.start_time))
        thread = threading.Thread(target=self._work, args=(runner,), name=f"job-{head.job_id}", daemon=True)
        self._running = _Running(head, runner, thread)
        thread.start()

    def _record_process(self, job_id: str, group: ProcessGroup) -> None:
        """On the worker thread, as the command starts: journal its group, for a restart to stop it."""
        try:
            self.journal.record_process(job_id, group)
        except JournalError as e:
            log.error("job %s: %s; if the agent dies now, its command runs on", job_id, e)
            return
        log.info("job %s: its command runs as process group %d", job_id, group.pgid)

    def _refuse(self, head: Head, reason: str) -> None:
        """The journal cannot record the job, so it must not run: report FAILED instead."""
        log.error("job %s: not run: %s", head.job_id, reason)
        self._unjournaled.add(head.job_id)
        result = RunResult.without_output(head.job_id, JobStatus.FAILED, protocol.utc_now(), reason)
        self.link.publish_status(result.status_message())

    def _work(self, runner: Runner) -> None:
        """The worker thread: run the command, hand the result to the main loop."""
        try:
            result = runner.run()
        except Exception as e:  # a bug must not leave the job IN_PROGRESS forever
            log.exception("job %s: the runner failed", runner.job_id)
            result = RunResult.without_output(
                runner.job_id, JobStatus.FAILED, runner.start_time, f"the agent failed to run the command: {e}")
        self.events.put(JobDone(result))

    def _on_job_done(self, result: RunResult) -> None:
        if self._running is None or self._running.head.job_id != result.job_id:
            return
        self._running = None
        message = result.status_message()
        self._record_result(result.job_id, message)
        log.info("job %s: %s exit=%s%s", result.job_id, result.status.value, result.exit_code,
                 f" ({result.reason})" if result.reason else "")
        self.link.publish_status(message)

    def _record_result(self, job_id: str, message: dict[str, Any]) -> None:
        try:
            self.journal.record_result(job_id, message)
        except JournalError as e:
            log.error("job %s: %s; publishing the result anyway", job_id, e)

    # --- stopping ---------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Kill a running command (its journal entry stays "started"), say offline, disconnect."""
        if self.stop_signal is not None:
            log.info("stopping on %s", signal.Signals(self.stop_signal).name)
        running = self._running
        if running is not None:
            log.info("job %s: killing it; after a restart it reports %s", running.head.job_id,
                     JobStatus.INTERRUPTED.value)
            running.runner.cancel("the agent is stopping")
            limits = running.runner.limits
            running.thread.join(timeout=limits.kill_grace + 2 * limits.pipe_grace + 5)
        self.link.stop()


def command_environment(environ: Mapping[str, str], device_id: str) -> dict[str, str]:
    """What commands see: the agent's environment without its settings (the password!), plus the device id."""
    env = {key: value for key, value in environ.items() if not key.startswith(ENV_PREFIX)}
    env[COMMAND_ENV_DEVICE_ID] = device_id
    return env


# --- entry point ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv, os.environ)
    except SettingsError as e:
        print(f"ota-agent: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        journal = Journal.open(settings.journal_dir, seq_scope=settings.server_key_b64)
    except OSError as e:
        log.error("cannot use the state directory %s: %s", settings.journal_dir, e)
        return 1
    agent = Agent(settings, journal, os.environ)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    return agent.run()
