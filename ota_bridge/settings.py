"""Service settings: read from command-line flags and OTA_BRIDGE_* variables, in this one place.

A flag wins over its variable, which wins over the default. A bad value raises ConfigError naming
both the flag and the variable. Nothing else in ota_bridge reads os.environ.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import unquote, urlsplit

from agent.protocol import DEFAULT_PREFIX, Topics

from .errors import ConfigError

ENV_PREFIX = "OTA_BRIDGE_"
SQLITE_FILE = "ota-bridge.db"  # the default database, in the data directory
ARTIFACT_DIR = "artifacts"  # the default artifact directory, in the data directory
DEFAULT_MAX_ARTIFACT_SIZE = 2 * 2**30
SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class MqttUrl:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool = False  # mqtts://

    def __str__(self) -> str:
        """The URL without the password, for logs."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    http: HostPort
    mqtt_listen: HostPort
    mqtt_url: MqttUrl | None  # None: run the embedded broker
    database: str
    data_dir: Path
    prefix: str
    log_level: str
    log_format: str  # "text" or "json"
    timeout_grace: float
    failpoints: frozenset[str]
    mosquitto_dir: Path | None
    mosquitto_dynsec: bool  # Mosquitto's accounts through its dynamic security plugin
    tls_cert: Path | None  # with tls_key: HTTPS for the API, and the embedded broker's TLS listener
    tls_key: Path | None
    mqtt_tls_listen: HostPort | None  # the embedded broker's TLS listener, if any
    mqtt_ca_file: Path | None  # for an mqtts:// --mqtt-url; None: the system's CAs
    mqtt_cert: Path | None  # with mqtt_key: the service's client certificate for an mqtts:// --mqtt-url
    mqtt_key: Path | None
    new_signing_key: bool = False  # make a new job-signing key even though the database has devices or jobs
    instance_id: str | None = None  # cluster mode: this instance's name among several on one database and broker
    public_url: str | None = None  # the API's address as devices reach it; None: derived from http (api_address)
    artifact_base_url: str | None = None  # devices fetch artifacts here (a CDN, nginx) instead of from the service
    artifact_dir: Path | None = None  # None: <data_dir>/artifacts
    max_artifact_size: int = DEFAULT_MAX_ARTIFACT_SIZE
    test_clock: Path | None = None  # tests only: the file the service's clock reads (ota_bridge/clock.py)

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.data_dir / SQLITE_FILE}"

    @property
    def artifact_directory(self) -> Path:
        return self.artifact_dir or self.data_dir / ARTIFACT_DIR

    @property
    def api_address(self) -> str:
        """--public-url, or the API's own: https with --tls-cert, its host (this machine's name when
        it listens on every address) and port."""
        if self.public_url is not None:
            return self.public_url
        host = socket.gethostname() if self.http.host in {"0.0.0.0", "::", ""} else self.http.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls_cert is not None else 'http'}://{host}:{self.http.port}"


def parse_host_port(value: str) -> HostPort:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:  # 0 would bind a port nothing could be told of
        raise ValueError(f"port {port!r} is not a number from 1 to 65535")
    return HostPort(host.strip("[]"), int(port))


DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def parse_mqtt_url(value: str) -> MqttUrl | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"expected mqtt:// or mqtts://[USER:PASS@]HOST:PORT, got scheme {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("the URL names no host")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as e:
        raise ValueError(f"bad port: {e}") from e
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return MqttUrl(parts.hostname, port, user, password, tls=parts.scheme == "mqtts")


def parse_optional_path(value: str) -> Path | None:
    return Path(value) if value else None


def parse_optional_host_port(value: str) -> HostPort | None:
    return parse_host_port(value) if value else None


def parse_database(value: str) -> str:
    if value and not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ValueError("expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    if value.startswith(("postgresql://", "postgres://")) and not urlsplit(value).path.strip("/"):
        raise ValueError("the URL names no database: expected postgresql://USER@HOST:PORT/DB")
    if value.startswith("sqlite:///") and not value[len("sqlite:///"):]:
        raise ValueError("the URL names no file: expected sqlite:///PATH")
    return value


def parse_instance_id(value: str) -> str | None:
    if value and not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", value):
        raise ValueError("expected 1 to 40 letters, digits, '-' or '_'")
    return value or None


def parse_prefix(value: str) -> str:
    return Topics(value).prefix


def parse_size(value: str) -> int:
    """Bytes, or a number with K, M, G or T (powers of 1024; KiB, MB ... mean the same)."""
    match = re.fullmatch(r"\s*([0-9]{1,15})\s*([kmgt]?)(?:i?b)?\s*", value.lower())
    if match is None or int(match.group(1)) == 0:
        raise ValueError("expected a size in bytes, more than 0, or with K, M, G or T (like 2G or 500MiB)")
    return int(match.group(1)) * SIZE_UNITS[match.group(2)]


def parse_optional_url(value: str) -> str | None:
    """An http(s) URL with a host and no query, fragment or spaces; its trailing '/' dropped."""
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected http[s]://HOST[:PORT][/PATH]")
    if parts.query or parts.fragment or any(c.isspace() for c in value):
        raise ValueError("the URL may hold no query, fragment or spaces")
    try:
        _ = parts.port
    except ValueError as e:
        raise ValueError(f"bad port: {e}") from e
    return value.rstrip("/")


def parse_seconds(value: str) -> float:
    seconds = float(value)
    if not 0 < seconds <= 86400:
        raise ValueError("expected seconds, more than 0 and at most 86400")
    return seconds


FAILPOINTS = frozenset({"exit-after-store", "slow-broker-accounts"})


def parse_failpoints(value: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    if names - FAILPOINTS:
        raise ValueError(f"unknown failpoint {sorted(names - FAILPOINTS)[0]!r}; known: {', '.join(sorted(FAILPOINTS))}")
    return names


def parse_switch(value: str) -> bool:
    """A flag given alone means true; its variable takes true/false, 1/0, yes/no."""
    word = value.strip().lower()
    if word in {"", "0", "false", "no"}:
        return False
    if word in {"1", "true", "yes"}:
        return True
    raise ValueError("expected true or false")


def parse_log_level(value: str) -> str:
    level = value.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("expected one of DEBUG, INFO, WARNING, ERROR")
    return level


def parse_log_format(value: str) -> str:
    word = value.strip().lower()
    if word not in {"text", "json"}:
        raise ValueError("expected text or json")
    return word


@dataclass(frozen=True)
class Option:
    name: str  # the flag without dashes; the variable is OTA_BRIDGE_<NAME>
    default: str
    parse: Callable[[str], object]
    help: str
    switch: bool = False  # a flag that takes no value (its variable still does)
    metavar: str | None = None  # how --help shows the value
    hidden: bool = False  # for tests only: left out of --help

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS = (
    Option("http", "127.0.0.1:8080", parse_host_port, "where the REST API listens", metavar="HOST:PORT"),
    Option("mqtt_listen", "0.0.0.0:1883", parse_host_port, "where the embedded MQTT broker listens",
           metavar="HOST:PORT"),
    Option("mqtt_url", "", parse_mqtt_url,
           "use this external broker instead of the embedded one (the password is better in the variable, "
           "out of ps)", metavar="mqtt[s]://USER:PASS@HOST:PORT"),
    Option("database", "", parse_database, "the database (default: SQLite in the data dir)",
           metavar="sqlite:///PATH|postgresql://USER@HOST:PORT/DB"),
    Option("data_dir", "./ota-bridge-data", Path, "directory for the database, admin token and keys",
           metavar="DIR"),
    Option("prefix", DEFAULT_PREFIX, parse_prefix, "MQTT topic prefix", metavar="PREFIX"),
    Option("log_level", "INFO", parse_log_level, "DEBUG, INFO, WARNING or ERROR", metavar="LEVEL"),
    Option("log_format", "text", parse_log_format, "text, or json: one JSON object a line, for log shippers",
           metavar="text|json"),
    Option("timeout_grace", "60", parse_seconds,
           "seconds past a job's timeout before the service itself marks a silent device's job TIMED_OUT",
           metavar="SECONDS"),
    Option("mosquitto_dir", "", parse_optional_path,
           "keep Mosquitto's password and ACL files here, from the device registry, and reload it on changes",
           metavar="DIR"),
    Option("mosquitto_dynsec", "", parse_switch,
           "keep Mosquitto's accounts in step with the device registry through its dynamic security plugin, "
           "at run time, as the admin `ota-bridge mosquitto-dynsec-config` made (with --mqtt-url; in cluster mode "
           "as this instance's own logins, made by `ota-bridge mosquitto-dynsec-instance`)", switch=True,
           metavar="true|false"),
    Option("tls_cert", "", parse_optional_path,
           "PEM certificate (chain) of this server: serves the REST API over HTTPS, with --tls-key", metavar="FILE"),
    Option("tls_key", "", parse_optional_path, "PEM private key of --tls-cert", metavar="FILE"),
    Option("mqtt_tls_listen", "", parse_optional_host_port,
           "where a TLS listener of the embedded MQTT broker listens, with --tls-cert and --tls-key",
           metavar="HOST:PORT"),
    Option("mqtt_ca_file", "", parse_optional_path,
           "PEM CA certificates that an mqtts:// --mqtt-url broker's certificate must chain to "
           "(default: the system's CAs)", metavar="FILE"),
    Option("mqtt_cert", "", parse_optional_path,
           "PEM client certificate for an mqtts:// --mqtt-url broker, with --mqtt-key", metavar="FILE"),
    Option("mqtt_key", "", parse_optional_path, "PEM private key of --mqtt-cert", metavar="FILE"),
    Option("new_signing_key", "", parse_switch,
           "make a new job-signing key when <data-dir>/job-signing.key is missing although the database has "
           "devices or jobs (every agent must then be given the new job-signing.pub)", switch=True,
           metavar="true|false"),
    Option("instance_id", "", parse_instance_id,
           "cluster mode: this instance's name, unique among the instances that share one PostgreSQL "
           "--database and one --mqtt-url broker (docs/scale.md)", metavar="NAME"),
    Option("public_url", "", parse_optional_url,
           "the REST API's address as devices reach it, for the artifact links in their jobs (default: from "
           "--http, https with --tls-cert, this machine's name when listening on 0.0.0.0 or ::)",
           metavar="http[s]://HOST:PORT"),
    Option("artifact_base_url", "", parse_optional_url,
           "devices fetch artifact files from URL/<sha256> (a CDN, nginx or bucket serving the artifact "
           "directory as is) instead of from the service; the signed SHA-256 and size still protect them",
           metavar="URL"),
    Option("artifact_dir", "", parse_optional_path,
           "where uploaded artifacts are kept, one file per SHA-256 (default: <data-dir>/artifacts)", metavar="DIR"),
    Option("max_artifact_size", "2G", parse_size, "the largest artifact an upload may hold (K, M, G, T: powers "
           "of 1024)", metavar="SIZE"),
    Option("failpoints", "", parse_failpoints,
           "for fault-injection tests only: exit-after-store kills the service right after it stores a result; "
           "slow-broker-accounts waits a second between committing a device's enable, disable or new password "
           "and telling the broker",
           hidden=True),
    Option("test_clock", "", parse_optional_path,
           "for tests only: the service's clock for rollouts, schedules and release delays is the ISO 8601 time "
           "in this file (real time while it is missing or empty)", metavar="FILE", hidden=True),
)
OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, names: tuple[str, ...] | None = None,
                  options: tuple[Option, ...] = OPTIONS) -> None:
    """Add the flags; their defaults are None so that resolve() can tell 'not given'."""
    for option in options:
        if names is None or option.name in names:
            extra = {"nargs": "?", "const": "true"} if option.switch else {}
            text = f"{option.help} [env {option.env}, default {option.default or 'none'}]"
            parser.add_argument(option.flag, dest=option.name, default=None, metavar=option.metavar, **extra,
                                help=argparse.SUPPRESS if option.hidden else text)


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from parsed flags, the environment and the defaults."""
    environ = os.environ if environ is None else environ
    values = {option.name: _value(option, args, environ) for option in OPTIONS}
    settings = Settings(**values)  # type: ignore[arg-type]
    _check_tls(settings)
    _check_accounts(settings)
    _check_cluster(settings)
    return settings


def named(name: str) -> str:
    """How an error names a setting: its flag and its variable."""
    option = OPTIONS_BY_NAME.get(name) or CLIENT_OPTIONS_BY_NAME[name]
    return f"{option.flag} / {option.env}"


def _check_accounts(s: Settings) -> None:
    if s.mosquitto_dynsec and s.mqtt_url is None:
        raise ConfigError(f"{named('mosquitto_dynsec')} is for a Mosquitto at {named('mqtt_url')}")
    if s.mosquitto_dynsec and s.mosquitto_dir is not None:
        raise ConfigError(f"give {named('mosquitto_dynsec')} or {named('mosquitto_dir')}, not both: "
                          "Mosquitto's accounts live in its dynamic security plugin or in files")


def _check_tls(s: Settings) -> None:
    """The TLS settings that only make sense together."""
    _pair(s.tls_cert, s.tls_key, "tls_cert", "tls_key")
    _pair(s.mqtt_cert, s.mqtt_key, "mqtt_cert", "mqtt_key")
    if s.mqtt_tls_listen is not None and s.tls_cert is None:
        raise ConfigError(f"{named('mqtt_tls_listen')} needs {named('tls_cert')} and {named('tls_key')}")
    if s.mqtt_tls_listen is not None and s.mqtt_url is not None:
        raise ConfigError(f"{named('mqtt_tls_listen')} is for the embedded broker, which does not run "
                          f"with {named('mqtt_url')}")
    for name in ("mqtt_ca_file", "mqtt_cert"):
        if getattr(s, name) is not None and not (s.mqtt_url and s.mqtt_url.tls):
            raise ConfigError(f"{named(name)} is for a broker at an mqtts:// {named('mqtt_url')}")


def _check_cluster(s: Settings) -> None:
    """Several instances share their state through PostgreSQL and a standard broker, nothing else."""
    if s.instance_id is None:
        return
    if not s.database.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{named('instance_id')} (cluster mode) needs a PostgreSQL {named('database')}: "
                          f"several instances cannot share SQLite")
    if s.mqtt_url is None:
        raise ConfigError(f"{named('instance_id')} (cluster mode) needs an external broker with shared "
                          f"subscriptions, e.g. Mosquitto 2, at {named('mqtt_url')}: the embedded broker is "
                          f"one instance's own")
    if s.mosquitto_dir is not None:
        raise ConfigError(f"{named('instance_id')} (cluster mode) cannot be used with {named('mosquitto_dir')}: "
                          f"several instances would rewrite one password file; keep Mosquitto's accounts in its "
                          f"dynamic security plugin with {named('mosquitto_dynsec')} instead (docs/scale.md)")


def _pair(first: object, second: object, first_name: str, second_name: str) -> None:
    if (first is None) != (second is None):
        raise ConfigError(f"give both {named(first_name)} and {named(second_name)}, or neither")


def _value(option: Option, args: argparse.Namespace, environ: Mapping[str, str]) -> object:
    given = getattr(args, option.name, None)
    raw = given if given is not None else environ.get(option.env, option.default)
    try:
        return option.parse(raw)
    except ValueError as e:
        raise ConfigError(f"bad value {raw!r} for {option.flag} / {option.env}: {e}") from e


# --- the CLI client (`ota-bridge workflow|job|device ...`): where the service is and who asks ----------------


def parse_server_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected http[s]://HOST:PORT")
    try:
        _ = parts.port  # urlsplit checks the port only when asked
    except ValueError as e:
        raise ValueError(f"bad port: {e}") from e
    return value.rstrip("/")


CLIENT_OPTIONS = (
    Option("server", "http://127.0.0.1:8080", parse_server_url, "the running service's URL",
           metavar="http[s]://HOST:PORT"),
    Option("token", "", str, "API token; better in the variable (out of ps) or the data dir's admin-token",
           metavar="TOKEN"),
    Option("ca_file", "", parse_optional_path,
           "PEM CA certificates that an https:// --server's certificate must chain to (default: the system's CAs)",
           metavar="FILE"),
    OPTIONS_BY_NAME["data_dir"],
)
CLIENT_OPTIONS_BY_NAME = {o.name: o for o in CLIENT_OPTIONS}


@dataclass(frozen=True)
class ClientSettings:
    server: str
    token: str  # "": read <data_dir>/admin-token
    token_source: str  # where the token came from, for error messages (never the token itself)
    ca_file: Path | None
    data_dir: Path


def resolve_client(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ClientSettings:
    environ = os.environ if environ is None else environ
    values = {option.name: _value(option, args, environ) for option in CLIENT_OPTIONS}
    token_option = CLIENT_OPTIONS[1]
    source = token_option.flag if getattr(args, "token", None) else token_option.env
    return ClientSettings(**values, token_source=source if values["token"] else "")  # type: ignore[arg-type]
