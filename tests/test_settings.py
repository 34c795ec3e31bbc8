"""Settings come from flags, then OTA_BRIDGE_* variables, then defaults; bad values name the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ota_bridge import settings
from ota_bridge.errors import ConfigError


def parse(argv: list[str], environ: dict[str, str] | None = None) -> settings.Settings:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    return settings.resolve(parser.parse_args(argv), environ or {})


def test_defaults() -> None:
    s = parse([])
    assert str(s.http) == "127.0.0.1:8080" and str(s.mqtt_listen) == "0.0.0.0:1883"
    assert s.mqtt_url is None and s.prefix == "ota/v1" and s.data_dir == Path("ota-bridge-data")
    assert s.database_url == "sqlite:///ota-bridge-data/ota-bridge.db"


def test_flag_beats_environment_beats_default() -> None:
    env = {"OTA_BRIDGE_HTTP": "0.0.0.0:9000", "OTA_BRIDGE_PREFIX": "fleet"}
    assert parse(["--http", "127.0.0.1:9001"], env).http.port == 9001
    assert parse([], env).http.port == 9000 and parse([], env).prefix == "fleet"


def test_mqtt_url_with_credentials() -> None:
    url = parse(["--mqtt-url", "mqtt://svc:p%40ss@broker.local:1884"]).mqtt_url
    assert (url.host, url.port, url.username, url.password) == ("broker.local", 1884, "svc", "p@ss")
    assert "p@ss" not in str(url)


@pytest.mark.parametrize("argv, named", [
    (["--http", "8080"], "--http / OTA_BRIDGE_HTTP"),
    (["--mqtt-listen", "h:99999"], "--mqtt-listen / OTA_BRIDGE_MQTT_LISTEN"),
    (["--mqtt-url", "http://x"], "--mqtt-url / OTA_BRIDGE_MQTT_URL"),
    (["--database", "mysql://x"], "--database / OTA_BRIDGE_DATABASE"),
    (["--prefix", "a/#"], "--prefix / OTA_BRIDGE_PREFIX"),
    (["--log-level", "loud"], "--log-level / OTA_BRIDGE_LOG_LEVEL"),
])
def test_bad_values_name_flag_and_variable(argv: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        parse(argv)


def test_bad_environment_value_is_named_too() -> None:
    with pytest.raises(ConfigError, match="OTA_BRIDGE_HTTP"):
        parse([], {"OTA_BRIDGE_HTTP": "nonsense"})
