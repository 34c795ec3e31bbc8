"""Settings come from flags, then OTA_BRIDGE_* variables, then defaults; bad values name the key."""

from __future__ import annotations

import argparse
import re
import socket
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
    load_pem_private_key,
)

from ota_bridge import settings, tls
from ota_bridge.errors import ConfigError
from tests.support.tls import ThrowawayCa


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
    (["--mqtt-listen", "127.0.0.1:0"], "--mqtt-listen / OTA_BRIDGE_MQTT_LISTEN"),  # the service could not reach it
    (["--mqtt-url", "http://x"], "--mqtt-url / OTA_BRIDGE_MQTT_URL"),
    (["--mqtt-tls-listen", "8883"], "--mqtt-tls-listen / OTA_BRIDGE_MQTT_TLS_LISTEN"),
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


def test_mqtts_url_defaults_to_port_8883() -> None:
    url = parse(["--mqtt-url", "mqtts://svc:pw@broker.local"]).mqtt_url
    assert (url.host, url.port, url.tls, str(url)) == ("broker.local", 8883, True, "mqtts://svc@broker.local:8883")
    assert parse(["--mqtt-url", "mqtt://broker.local"]).mqtt_url.tls is False


def test_tls_files_come_from_flags_or_variables() -> None:
    env = {"OTA_BRIDGE_TLS_KEY": "api.key", "OTA_BRIDGE_MQTT_TLS_LISTEN": "0.0.0.0:8883"}
    s = parse(["--tls-cert", "api.crt"], env)
    assert (s.tls_cert, s.tls_key, str(s.mqtt_tls_listen)) == (Path("api.crt"), Path("api.key"), "0.0.0.0:8883")
    assert parse([]).tls_cert is None and parse([]).mqtt_tls_listen is None


@pytest.mark.parametrize("argv, named", [
    (["--tls-cert", "a.crt"], "--tls-cert / OTA_BRIDGE_TLS_CERT and --tls-key / OTA_BRIDGE_TLS_KEY"),
    (["--tls-key", "a.key"], "--tls-cert / OTA_BRIDGE_TLS_CERT and --tls-key / OTA_BRIDGE_TLS_KEY"),
    (["--mqtt-url", "mqtts://h", "--mqtt-key", "k"], "--mqtt-cert / OTA_BRIDGE_MQTT_CERT and --mqtt-key"),
    (["--mqtt-tls-listen", "0.0.0.0:8883"], "--mqtt-tls-listen / OTA_BRIDGE_MQTT_TLS_LISTEN needs --tls-cert"),
    (["--mqtt-tls-listen", "0.0.0.0:8883", "--tls-cert", "c", "--tls-key", "k", "--mqtt-url", "mqtt://h"],
     "is for the embedded broker"),
    (["--mqtt-url", "mqtt://h", "--mqtt-ca-file", "ca.crt"], "--mqtt-ca-file / OTA_BRIDGE_MQTT_CA_FILE is for"),
    (["--mqtt-cert", "c", "--mqtt-key", "k"], "--mqtt-cert / OTA_BRIDGE_MQTT_CERT is for a broker at an mqtts://"),
])
def test_tls_settings_that_only_make_sense_together(argv: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse(argv)


def test_tls_files_that_cannot_be_used_are_named(tmp_path: Path) -> None:
    pki = ThrowawayCa(tmp_path)
    bad_ca = parse(["--mqtt-url", "mqtts://h", "--mqtt-ca-file", str(pki.server.key)])
    with pytest.raises(ConfigError, match="--mqtt-ca-file / OTA_BRIDGE_MQTT_CA_FILE: .* no usable PEM CA"):
        tls.broker_client_context(bad_ca)
    missing = parse(["--mqtt-url", "mqtts://h", "--mqtt-cert", str(pki.server.cert), "--mqtt-key", "/nonexistent"])
    with pytest.raises(ConfigError, match="--mqtt-key / OTA_BRIDGE_MQTT_KEY: cannot read /nonexistent"):
        tls.broker_client_context(missing)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(load_pem_private_key(pki.server.key.read_bytes(), None).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match="--tls-key / OTA_BRIDGE_TLS_KEY: .* is encrypted"):
        tls.server_context(parse(["--tls-cert", str(pki.server.cert), "--tls-key", str(encrypted)]))


def test_tls_contexts_require_tls_1_2_and_check_the_brokers_name(tmp_path: Path) -> None:
    pki = ThrowawayCa(tmp_path)
    server = tls.server_context(parse(["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]))
    client = tls.broker_client_context(parse(["--mqtt-url", "mqtts://h", "--mqtt-ca-file", str(pki.ca_file)]))
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    assert tls.server_context(parse([])) is None and tls.broker_client_context(parse([])) is None


def test_artifact_settings_and_the_public_url_the_heads_name() -> None:
    s = parse([])
    assert s.artifact_directory == Path("ota-bridge-data/artifacts") and s.max_artifact_size == 2 * 2**30
    assert s.api_address == "http://127.0.0.1:8080" and s.artifact_base_url is None
    assert parse(["--http", "0.0.0.0:9000"]).api_address == f"http://{socket.gethostname()}:9000"
    assert parse(["--http", "[::1]:9000"]).api_address == "http://[::1]:9000"
    assert parse(["--tls-cert", "c.pem", "--tls-key", "k.pem"]).api_address == "https://127.0.0.1:8080"
    given = parse(["--public-url", "https://ota.example.com/", "--artifact-base-url", "https://cdn.example.com/a/",
                   "--artifact-dir", "/srv/artifacts", "--max-artifact-size", "500MiB"])
    assert given.api_address == "https://ota.example.com" and given.artifact_base_url == "https://cdn.example.com/a"
    assert given.artifact_directory == Path("/srv/artifacts") and given.max_artifact_size == 500 * 2**20
    assert parse([], {"OTA_BRIDGE_MAX_ARTIFACT_SIZE": "1048576"}).max_artifact_size == 2**20


@pytest.mark.parametrize("argv, named", [
    (["--public-url", "ota.example.com"], "--public-url / OTA_BRIDGE_PUBLIC_URL"),
    (["--artifact-base-url", "https://cdn.example.com/a?x=1"], "--artifact-base-url / OTA_BRIDGE_ARTIFACT_BASE_URL"),
    (["--max-artifact-size", "2 lots"], "--max-artifact-size / OTA_BRIDGE_MAX_ARTIFACT_SIZE"),
    (["--max-artifact-size", "0"], "--max-artifact-size / OTA_BRIDGE_MAX_ARTIFACT_SIZE"),
])
def test_bad_artifact_settings_name_flag_and_variable(argv: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        parse(argv)


def test_cluster_mode_takes_the_dynamic_security_plugin_from_variables_too() -> None:
    env = {"OTA_BRIDGE_INSTANCE_ID": "web-1", "OTA_BRIDGE_DATABASE": "postgresql://u@db:5432/ota",
           "OTA_BRIDGE_MQTT_URL": "mqtt://broker:1883", "OTA_BRIDGE_MOSQUITTO_DYNSEC": "true"}
    s = parse([], env)
    assert s.instance_id == "web-1" and s.mosquitto_dynsec
    with pytest.raises(ConfigError, match="one password file.*--mosquitto-dynsec / OTA_BRIDGE_MOSQUITTO_DYNSEC"):
        parse(["--mosquitto-dir", "/var/lib/ota-bridge/mosquitto"], {**env, "OTA_BRIDGE_MOSQUITTO_DYNSEC": "false"})
