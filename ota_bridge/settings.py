"""Service settings: read from command-line flags and OTA_BRIDGE_* variables, in this one place.

A flag wins over its variable, which wins over the default. A bad value raises ConfigError naming
both the flag and the variable. Nothing else in ota_bridge reads os.environ.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import unquote, urlsplit

from agent.protocol import DEFAULT_PREFIX, Topics

from .errors import ConfigError

ENV_PREFIX = "OTA_BRIDGE_"


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

    def __str__(self) -> str:
        """The URL without the password, for logs."""
        user = f"{self.username}@" if self.username else ""
        return f"mqtt://{user}{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    http: HostPort
    mqtt_listen: HostPort
    mqtt_url: MqttUrl | None  # None: run the embedded broker
    database: str
    data_dir: Path
    prefix: str
    log_level: str
    timeout_grace: float
    failpoints: frozenset[str]
    mosquitto_dir: Path | None

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.data_dir / 'ota-bridge.db'}"


def parse_host_port(value: str) -> HostPort:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not a number from 0 to 65535")
    return HostPort(host.strip("[]"), int(port))


def parse_mqtt_url(value: str) -> MqttUrl | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme != "mqtt":
        raise ValueError(f"expected mqtt://[USER:PASS@]HOST:PORT, got scheme {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("the URL names no host")
    try:
        port = parts.port or 1883
    except ValueError as e:
        raise ValueError(f"bad port: {e}") from e
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return MqttUrl(parts.hostname, port, user, password)


def parse_database(value: str) -> str:
    if value and not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ValueError("expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    return value


def parse_prefix(value: str) -> str:
    return Topics(value).prefix


def parse_seconds(value: str) -> float:
    seconds = float(value)
    if not 0 < seconds <= 86400:
        raise ValueError("expected seconds, more than 0 and at most 86400")
    return seconds


FAILPOINTS = frozenset({"exit-after-store"})


def parse_failpoints(value: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    if names - FAILPOINTS:
        raise ValueError(f"unknown failpoint {sorted(names - FAILPOINTS)[0]!r}; known: {', '.join(sorted(FAILPOINTS))}")
    return names


def parse_log_level(value: str) -> str:
    level = value.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("expected one of DEBUG, INFO, WARNING, ERROR")
    return level


@dataclass(frozen=True)
class Option:
    name: str  # the flag without dashes; the variable is OTA_BRIDGE_<NAME>
    default: str
    parse: Callable[[str], object]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS = (
    Option("http", "127.0.0.1:8080", parse_host_port, "HOST:PORT of the REST API"),
    Option("mqtt_listen", "0.0.0.0:1883", parse_host_port, "HOST:PORT of the embedded MQTT broker"),
    Option("mqtt_url", "", parse_mqtt_url,
           "use this external broker (mqtt://USER:PASS@HOST:PORT) instead of the embedded one"),
    Option("database", "", parse_database, "sqlite:///PATH or postgresql://... (default: SQLite in the data dir)"),
    Option("data_dir", "./ota-bridge-data", Path, "directory for the database, admin token and keys"),
    Option("prefix", DEFAULT_PREFIX, parse_prefix, "MQTT topic prefix"),
    Option("log_level", "INFO", parse_log_level, "DEBUG, INFO, WARNING or ERROR"),
    Option("timeout_grace", "60", parse_seconds,
           "seconds past a job's timeout before the service itself marks a silent device's job TIMED_OUT"),
    Option("mosquitto_dir", "", lambda v: Path(v) if v else None,
           "keep Mosquitto's password and ACL files here, from the device registry, and reload it on changes"),
    Option("failpoints", "", parse_failpoints,
           "for fault-injection tests only: exit-after-store kills the service right after it stores a result"),
)
OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}


def add_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """Add the flags; their defaults are None so that resolve() can tell 'not given'."""
    for option in OPTIONS:
        if names is None or option.name in names:
            parser.add_argument(option.flag, dest=option.name, default=None,
                                help=f"{option.help} [env {option.env}, default {option.default or 'none'}]")


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from parsed flags, the environment and the defaults."""
    environ = os.environ if environ is None else environ
    values = {option.name: _value(option, args, environ) for option in OPTIONS}
    return Settings(**values)  # type: ignore[arg-type]


def _value(option: Option, args: argparse.Namespace, environ: Mapping[str, str]) -> object:
    given = getattr(args, option.name, None)
    raw = given if given is not None else environ.get(option.env, option.default)
    try:
        return option.parse(raw)
    except ValueError as e:
        raise ConfigError(f"bad value {raw!r} for {option.flag} / {option.env}: {e}") from e
