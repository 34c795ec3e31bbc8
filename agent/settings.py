"""The agent's settings: flags, OTA_AGENT_* environment variables, and the broker's TLS context.

    ota-agent --broker mqtt://HOST:PORT --device-id ID --server-key-file FILE [--password-file FILE] ...
    ota-agent --broker mqtts://HOST:PORT [--ca-file FILE] [--cert-file FILE --key-file FILE] ...

Over mqtts:// (TLS 1.2 or later) the broker's certificate must chain to --ca-file (default: the
system's CAs) and name the broker's host; there is no way to turn that check off. Artifacts fetched
over https:// are checked against the system's CAs plus --ca-file's (agent/download.py).

Every flag can also come from an environment variable OTA_AGENT_<FLAG> (e.g.
OTA_AGENT_DEVICE_ID); a flag wins over its variable. A missing or bad value raises
SettingsError, naming the flag and its variable (ota-agent then exits 2).
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import re
import ssl
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, NamedTuple
from urllib.parse import urlsplit

from . import job_signature, protocol
from .jsonlog import LOG_FORMATS
from .policy import CommandPolicy, command_is_usable, normalize_command, prefix_is_usable
from .protocol import Topics

if TYPE_CHECKING:  # argparse is imported only for --help, --version and a command line it must judge
    import argparse

ENV_PREFIX = "OTA_AGENT_"
SYSTEM_STATE_DIR = Path("/var/lib/ota-agent")
DEFAULT_KILL_GRACE = 5.0
# The service always publishes a signed head (an idle one when nothing is pending): without one this long
# after subscribing, the agent is probably on another broker, and says so.
DEFAULT_HEAD_WAIT = 30.0
DEFAULT_ARTIFACT_CACHE_SIZE = 1024**3  # bytes of downloaded artifacts kept after their jobs (1 GiB)
_SIZE_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
               "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}
_BYTE_SIZE = r"([0-9]+) ?([KMGT]i?)?B?"  # compiled by the first --artifact-cache-size read, not at every start
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
log = logging.getLogger("ota-agent")


DISTRIBUTIONS = ("ota-agent", "ota-bridge")  # installed alone, or with the service
UNKNOWN_VERSION = "0+unknown"


@functools.cache
def agent_version() -> str:
    """The installed agent's version, as importlib.metadata.version would say it: the `ota-agent`
    distribution (installed alone, agent/pyproject.toml), else `ota-bridge` (with the service).

    Read from the first `ota_agent-*` / `ota_bridge-*` `.dist-info/METADATA` (or `.egg-info/PKG-INFO`) on sys.path,
    as importlib.metadata does, without importing it: that module (with zipfile, csv and the
    rest) would add about 1 MiB to the resident size of an agent that idles for months. Each
    directory is listed once, for both names.
    """
    prefixes = tuple(distribution.replace("-", "_") + "-" for distribution in DISTRIBUTIONS)
    found: dict[str, str] = {}  # prefix: the version of its first distribution on sys.path
    for entry in sys.path:
        try:
            names = sorted(name for name in os.listdir(entry or ".") if name.startswith(prefixes))
        except OSError:
            continue
        for name in names:
            prefix = next(prefix for prefix in prefixes if name.startswith(prefix))
            if prefix not in found and (version := _metadata_version(Path(entry or ".", name))):
                found[prefix] = version
        if prefixes[0] in found:
            break
    return next((found[prefix] for prefix in prefixes if prefix in found), UNKNOWN_VERSION)


def _metadata_version(info_dir: Path) -> str | None:
    """The Version field of one .dist-info or .egg-info directory; None if it is not one."""
    metadata_file = {".dist-info": "METADATA", ".egg-info": "PKG-INFO"}.get(info_dir.suffix)
    if metadata_file is None:
        return None
    try:
        with (info_dir / metadata_file).open(encoding="utf-8") as lines:
            for line in lines:
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
                if not line.strip():
                    return None  # the headers end at the first blank line
    except (OSError, UnicodeDecodeError):
        return None
    return None



class SettingsError(Exception):
    """A flag (or its environment variable) is missing or bad."""

    def __init__(self, dest: str, problem: str) -> None:
        flag = "--" + dest.replace("_", "-")
        super().__init__(f"{flag} (or {env_name(dest)}) {problem}")
        self.flag = flag


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


class Settings(NamedTuple):
    """The agent's settings, immutable once read.

    A NamedTuple rather than a frozen dataclass: the dataclasses module (with inspect, ast and
    dis) and the code it generates per class were most of what an agent loads and runs at start
    beyond a bare paho device (bench/profile_notes.md, agent-idle-rss)."""

    broker_host: str
    broker_port: int
    device_id: str
    username: str
    password: str | None  # never in repr (__repr__)
    state_dir: Path
    prefix: str
    output_cap: int
    default_timeout: int
    kill_grace: float
    log_level: str
    server_keys: tuple[bytes, ...]  # the service's Ed25519 public keys, raw: every head must be signed by one
    policy: CommandPolicy = CommandPolicy()
    tls: ssl.SSLContext | None = None  # None: plain mqtt://; not in repr
    server_key_file: Path | None = None  # where server_keys came from; the agent re-reads it when it changes
    log_format: str = "text"  # or "json": one JSON object a line (agent/jsonlog.py)
    head_wait: float = DEFAULT_HEAD_WAIT  # seconds after subscribing without a signed head before it warns
    ca_file: Path | None = None  # CA certificates trusted for mqtts:// and, beside the system's, for https:// downloads
    artifact_cache_size: int = DEFAULT_ARTIFACT_CACHE_SIZE  # bytes of artifacts kept after their jobs

    def __repr__(self) -> str:
        shown = (f"{name}={value!r}" for name, value in self._asdict().items() if name not in _NOT_IN_REPR)
        return f"Settings({', '.join(shown)})"

    @property
    def server_keys_b64(self) -> tuple[str, ...]:
        return keys_b64(self.server_keys)

    @property
    def broker_url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.broker_host}:{self.broker_port}"

    @property
    def journal_dir(self) -> Path:
        return self.state_dir / self.device_id


_NOT_IN_REPR = frozenset({"password", "tls"})  # a secret; a context that says nothing


def build_parser() -> argparse.ArgumentParser:
    """The flags as argparse reads them: for --help, --version, abbreviated flags and errors
    (read_flags reads every other command line the same way without it)."""
    import argparse  # noqa: PLC0415 - lazily: ~0.35 MiB an idle agent never needs (bench/profile_notes.md)

    parser = argparse.ArgumentParser(
        prog="ota-agent",
        description="Run the jobs the ota-bridge service sends to this device. "
        f"Every flag also reads {ENV_PREFIX}<FLAG> from the environment (e.g. {env_name('device_id')}).",
        epilog="Each command runs with sh -c, with OTA_DEVICE_ID and OTA_JOB_ID in its environment. A job whose "
        "head names artifacts first has them fetched (resumed after a cut or a restart) and checked against their "
        "signed size and SHA-256; its command then also gets OTA_ARTIFACT_DIR (a directory holding each file under "
        "its name), OTA_ARTIFACT_COUNT and, for each artifact i from 1, OTA_ARTIFACT_<i>_PATH, OTA_ARTIFACT_<i>_NAME "
        "and OTA_ARTIFACT_<i>_SHA256 (docs/artifacts.md).",
    )
    add = parser.add_argument
    add("--broker", metavar="mqtt[s]://HOST:PORT", help="the MQTT broker: mqtt://HOST:PORT (default port 1883; "
        "HOST:PORT also accepted) or, over TLS, mqtts://HOST:PORT (default port 8883)")
    add("--ca-file", metavar="FILE", help="PEM CA certificates: an mqtts:// broker's certificate must chain to them "
        "(default: the system's CAs) and name the broker's host; https:// artifact downloads trust them besides "
        "the system's CAs")
    add("--cert-file", metavar="FILE", help="mqtts:// only: a PEM client certificate, for a broker that asks "
        "for one (with --key-file)")
    add("--key-file", metavar="FILE", help="the unencrypted PEM private key of --cert-file")
    add("--device-id", metavar="ID", help="this device's id; also the MQTT client id")
    add("--username", metavar="NAME", help="MQTT user name (default: the device id)")
    add("--password", metavar="PASSWORD", help="MQTT password; ps shows it: prefer --password-file or "
        f"{env_name('password')}")
    add("--password-file", metavar="FILE", help="a file holding the MQTT password (read at start; a new one "
        "from POST /v1/device/ID/credentials needs a restart). While the broker refuses it, the agent "
        "retries with a wait doubling up to 5 minutes")
    add("--state-dir", metavar="DIR", help=f"where the journal lives (default {SYSTEM_STATE_DIR} "
        "when writable, else ~/.local/state/ota-agent); one subdirectory per device id. Created mode 0700; "
        "refused if a symlink, owned by another user, or writable by group or others")
    add("--prefix", help=f"topic prefix (default {protocol.DEFAULT_PREFIX})")
    add("--output-cap", metavar="BYTES", help=f"bytes of stdout/stderr kept per stream, the tail "
        f"(default {protocol.OUTPUT_CAP_BYTES})")
    add("--default-timeout", metavar="SECONDS", help="timeout of a job whose head has no TimeoutSeconds "
        f"(default {protocol.DEFAULT_TIMEOUT_SECONDS})")
    add("--kill-grace", metavar="SECONDS", help="how long a killed command's process group gets between "
        f"SIGTERM and SIGKILL (default {DEFAULT_KILL_GRACE:g})")
    add("--log-level", metavar="LEVEL", help=f"one of {', '.join(LOG_LEVELS)} (default INFO)")
    add("--log-format", metavar="text|json", help="text (default), or json: one JSON object a line, with "
        "JobId and DeviceId fields, for log shippers")
    add("--server-key", metavar="BASE64[,BASE64]", help="the service's job-signing public key, or several "
        "separated by commas during a key rotation (prefer --server-key-file)")
    add("--server-key-file", metavar="FILE", help="a file holding the service's job-signing public key: "
        "the service's <data-dir>/job-signing.pub, or PublicKey from its GET /v1/signing-key (required); "
        "one base64 key a line (two during a key rotation); re-read whenever it changes")
    add("--allow-command", metavar="COMMAND", action="append", help="run only this exact command (runs of blanks "
        f"count as one; repeatable; {env_name('allow_command')} takes a newline-separated list). With several "
        "--allow-* flags, a command must match one of them")
    add("--allow-commands-file", metavar="FILE", help="exact commands to allow, one per line (blank lines and "
        "lines starting with # skipped); the file must not be writable by group or others")
    add("--allow-prefix", metavar="PREFIX", action="append", help="run only commands that are PREFIX or start "
        "with PREFIX and a blank, hold no shell special character, and pass no option (a word starting "
        "with '-') after PREFIX: options let a signed job run anything, e.g. apt-get -o Dir::Bin::dpkg=... "
        f"(repeatable; {env_name('allow_prefix')} takes a comma- or newline-separated list)")
    add("--allow-prefix-with-options", metavar="PREFIX", action="append", help="like --allow-prefix, but "
        "words after PREFIX may be options: only for a program no option can make run other commands")
    add("--allow-scripts-dir", metavar="DIR", help="run only commands that are the absolute path of a script "
        "inside DIR, with plain-word arguments")
    add("--artifact-cache-size", metavar="BYTES", help="bytes of downloaded artifacts kept (by SHA-256, in "
        "<state-dir>/<device-id>/artifacts) after their jobs, so that the same artifact is not fetched twice; the "
        "least recently used go first (default 1GiB; suffixes K, M, G, KiB, MiB, GiB; 0: keep none). A job's "
        "command finds its artifacts in $OTA_ARTIFACT_DIR (docs/artifacts.md)")
    add("--head-wait", metavar="SECONDS", help=argparse.SUPPRESS)  # for tests: see Settings.head_wait
    add("--version", action="version", version=f"ota-agent {agent_version()}")
    return parser


_SETTING_NAMES = (
    "broker", "device_id", "username", "password", "password_file", "state_dir", "prefix",
    "output_cap", "default_timeout", "kill_grace", "log_level", "log_format", "server_key", "server_key_file",
    "allow_scripts_dir", "allow_commands_file", "ca_file", "cert_file", "key_file", "head_wait",
    "artifact_cache_size",
)
# Repeatable flags; their variable holds a list.
_LIST_SETTING_NAMES = ("allow_prefix", "allow_prefix_with_options", "allow_command")
# Every flag that takes a value, by its name on the command line.
_FLAG_NAMES = {"--" + name.replace("_", "-"): name for name in (*_SETTING_NAMES, *_LIST_SETTING_NAMES)}


def load_settings(argv: list[str] | None, environ: Mapping[str, str]) -> Settings:
    """Settings from flags, then OTA_AGENT_* variables, then defaults. Raises SettingsError."""
    args = read_flags(sys.argv[1:] if argv is None else argv)
    raw = {name: _flag_or_env(args.get(name), environ.get(env_name(name))) for name in _SETTING_NAMES}
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
        log_format=_log_format(raw["log_format"] or "text"),
        server_keys=_server_keys(raw["server_key"], raw["server_key_file"]),
        server_key_file=Path(raw["server_key_file"]) if raw["server_key_file"] else None,
        policy=CommandPolicy(
            allow_prefixes=_allow_prefixes("allow_prefix", args.get("allow_prefix"), environ),
            option_prefixes=_allow_prefixes("allow_prefix_with_options", args.get("allow_prefix_with_options"),
                                            environ),
            allow_commands=_allow_commands(args.get("allow_command"), environ, raw["allow_commands_file"]),
            scripts_dir=_scripts_dir(raw["allow_scripts_dir"]),
        ),
        tls=_broker_tls(raw, tls),
        head_wait=_positive_number(raw, "head_wait", DEFAULT_HEAD_WAIT),
        ca_file=Path(raw["ca_file"]) if raw["ca_file"] else None,
        artifact_cache_size=_byte_size(raw, "artifact_cache_size", DEFAULT_ARTIFACT_CACHE_SIZE),
    )


def read_flags(argv: list[str]) -> dict[str, str | list[str]]:
    """The flags given, by setting name: a string, or a list for a repeatable flag.

    A command line of whole flag names, each `--flag VALUE` or `--flag=VALUE`, is read here;
    anything else (--help, --version, an abbreviated or unknown flag, a missing value, `--`) goes
    to argparse (build_parser), which prints and exits or reads it: both read every command line
    the same way (tests/test_agent_settings.py compares them)."""
    flags = _read_whole_flags(argv)
    if flags is None:
        args = vars(build_parser().parse_args(_join_values(argv)))
        flags = {name: value for name, value in args.items() if value is not None}
    return flags


def _read_whole_flags(argv: list[str]) -> dict[str, str | list[str]] | None:
    """`--flag VALUE` and `--flag=VALUE` of whole flag names; None at anything else."""
    flags: dict[str, str | list[str]] = {}
    args = iter(argv)
    for arg in args:
        flag, joined, value = arg.partition("=")
        name = _FLAG_NAMES.get(flag)
        if not joined:
            value = next(args, None)
        if name is None or value is None or value == "--":  # argparse drops a value "--": its way stands
            return None
        if name in _LIST_SETTING_NAMES:
            flags[name] = [*flags.get(name, ()), value]
        else:
            flags[name] = value
    return flags


def _join_values(argv: list[str]) -> list[str]:
    """Turn `--flag VALUE` into `--flag=VALUE`, so a value may start with '-' (e.g. a password)."""
    joined: list[str] = []
    pending: str | None = None
    for arg in argv:
        if pending is not None:
            joined.append(f"{pending}={arg}")
            pending = None
        elif arg in _FLAG_NAMES:
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
    """The TLS context for an mqtts:// broker; None for mqtt://, which takes no client certificate
    (a --ca-file is still checked: https:// downloads use it)."""
    if tls:
        return tls_context(raw)
    for name in ("cert_file", "key_file"):
        if raw[name] is not None:
            raise SettingsError(name, "is for a TLS broker: give --broker mqtts://HOST:PORT")
    _check_ca_file(raw)
    return None


def _check_ca_file(raw: dict[str, str | None]) -> None:
    """Refuse a --ca-file without a PEM CA certificate (without loading the system's CAs: that waits
    for the first https:// download)."""
    cafile = _readable(raw, "ca_file")
    if cafile is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cafile)
        except ssl.SSLError as e:
            raise SettingsError("ca_file", f"names a file with no usable PEM CA certificate: {e}") from e


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


def keys_b64(keys: tuple[bytes, ...]) -> tuple[str, ...]:
    return tuple(base64.b64encode(key).decode("ascii") for key in keys)


def read_key_file(path: Path) -> tuple[bytes, ...]:
    """The keys in a key file. Raises OSError, UnicodeDecodeError or ValueError."""
    return job_signature.parse_public_keys(path.read_text(encoding="utf-8"))


class TrustedKeys:
    """The service keys the agent trusts: --server-key, or --server-key-file, re-read when it changes.

    A key rotation pushes the new key with a job (signed with the old key) that rewrites the
    key file; the agent trusts the new keys within KEY_FILE_CHECK_SECONDS. A file that cannot
    be read or holds a bad key changes nothing (logged).
    """

    def __init__(self, settings: Settings, check_seconds: float = 1.0) -> None:
        self.keys = settings.server_keys
        self.path = settings.server_key_file
        self.check_seconds = check_seconds
        self._stamp = self._stat()
        self._next_check = 0.0

    @property
    def b64(self) -> tuple[str, ...]:
        return keys_b64(self.keys)

    def changed(self) -> bool:
        """Re-read the key file if it changed (checked at most every check_seconds); True when
        the keys are now different."""
        now = time.monotonic()
        if self.path is None or now < self._next_check:
            return False
        self._next_check = now + self.check_seconds
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            keys = read_key_file(self.path)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            log.error("the key file %s changed but cannot be used (%s); still trusting %s", self.path, e,
                      " and ".join(self.b64))
            return False
        if keys == self.keys:
            return False
        self.keys = keys
        return True

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path) if self.path is not None else None
        except OSError:
            return None
        return None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns)


def _server_keys(key: str | None, key_file: str | None) -> tuple[bytes, ...]:
    """The service's public keys; the agent does not start without one."""
    if key is not None and key_file is not None:
        raise SettingsError("server_key", "and --server-key-file are both set; give one")
    if key is None and key_file is None:
        raise SettingsError("server_key_file", "is required (or --server-key): the agent runs only jobs the "
                            f"service signed; {job_signature.WHERE_TO_GET_THE_KEY}")
    name = "server_key" if key is not None else "server_key_file"
    try:
        if key is not None:
            return job_signature.parse_public_keys(key.replace(",", "\n"))
        return read_key_file(Path(str(key_file)))
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(name, f"names a file that cannot be read: {e}") from e
    except ValueError as e:
        raise SettingsError(name, f"is bad: {e}; {job_signature.WHERE_TO_GET_THE_KEY}") from e


def _allow_prefixes(name: str, flags: list[str] | None, environ: Mapping[str, str]) -> tuple[str, ...]:
    """A prefix flag's values, or its variable's comma- or newline-separated list; blanks trimmed."""
    values = _list_values(name, flags, environ.get(env_name(name)), separators=",\n")
    for value in values:
        if not prefix_is_usable(value):
            raise SettingsError(name, f"is {value!r}, which holds a shell special or control character or an "
                                "unclosed quote; no command with one is ever allowed by prefix (use "
                                "--allow-command or --allow-scripts-dir)")
    return tuple(values)


def _allow_commands(flags: list[str] | None, environ: Mapping[str, str], file: str | None) -> tuple[str, ...]:
    """--allow-command values (or the variable's newline-separated list) and the commands file's lines."""
    values = [(value, "allow_command") for value in
              _list_values("allow_command", flags, environ.get(env_name("allow_command")), separators="\n")]
    values += [(value, "allow_commands_file") for value in _commands_file(file)]
    for value, name in values:
        if not command_is_usable(value):
            raise SettingsError(name, f"holds {value!r}, which holds a control character; no job could match it")
    return tuple(dict.fromkeys(normalize_command(value) for value, _ in values))


def _list_values(name: str, flags: list[str] | None, env: str | None, separators: str) -> list[str]:
    """A repeatable flag's values, or its variable split at `separators`; blanks trimmed, none empty."""
    if flags is not None:
        values = [value.strip(" \t") for value in flags]
        if not all(values):
            raise SettingsError(name, "is empty; give the commands to allow")
        return values
    text = env or ""
    for separator in separators[1:]:
        text = text.replace(separator, separators[0])
    return [value.strip(" \t") for value in text.split(separators[0]) if value.strip(" \t")]


def _commands_file(path: str | None) -> list[str]:
    """The commands file's lines, minus blank ones and # comments. Anyone who may write it decides what runs."""
    if path is None:
        return []
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError("allow_commands_file", f"names a file that cannot be read: {e}") from e
    if mode & 0o022:
        raise SettingsError("allow_commands_file", f"names {path}, which group or others may write "
                            f"(mode {stat.S_IMODE(mode):04o}): chmod go-w it")
    lines = (line.rstrip("\r").strip(" \t") for line in text.split("\n"))
    return [line for line in lines if line and not line.startswith("#")]


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


def _byte_size(raw: dict[str, str | None], name: str, default: int) -> int:
    """A number of bytes, 0 or more, with an optional unit: K, M, G, T (powers of 1000) or KiB, MiB, GiB, TiB."""
    value = raw[name]
    if value is None:
        return default
    match = re.fullmatch(_BYTE_SIZE, value.strip(), re.IGNORECASE)
    if match is None:
        raise SettingsError(name, f"is {value!r}, expected a number of bytes (0 or more), e.g. 500M or 2GiB")
    number, unit = match.groups()
    return int(number) * _SIZE_UNITS[(unit or "").upper()]


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise SettingsError("log_level", f"is {value!r}, expected one of {', '.join(LOG_LEVELS)}")
    return value.upper()


def _log_format(value: str) -> str:
    if value.lower() not in LOG_FORMATS:
        raise SettingsError("log_format", f"is {value!r}, expected one of {', '.join(LOG_FORMATS)}")
    return value.lower()


def default_state_dir() -> Path:
    """The system state dir when this user may write it, else one in the user's home."""
    probe = SYSTEM_STATE_DIR if SYSTEM_STATE_DIR.exists() else SYSTEM_STATE_DIR.parent
    if os.access(probe, os.W_OK):
        return SYSTEM_STATE_DIR
    return Path.home() / ".local" / "state" / "ota-agent"

