"""TLS end to end, with a throwaway CA made at test time: HTTPS for the REST API, mqtts:// for the
service's broker link and the agent, on Mosquitto as shipped (plus a TLS listener) and on the
embedded broker's TLS listener. Every client checks the server's certificate and host name."""

from __future__ import annotations

import http.client
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import Launcher
from tests.support.mosquitto import free_port, secure_mosquitto, tls_listener
from tests.support.processes import REPO, Agent, Api, Service, wait_until
from tests.support.tls import ThrowawayCa

WAIT = 20.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayCa:
    return ThrowawayCa(tmp_path_factory.mktemp("pki"))


def https_flags(pki: ThrowawayCa) -> tuple[str, ...]:
    return "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)


def run_job(service: Service, device: str, text: str) -> None:
    api = service.api
    job = api.wait_job(api.submit(api.workflow(f"echo {text}"), DeviceId=device), timeout=WAIT)
    assert job["Status"] == "SUCCEEDED" and job["Result"] == f"{text}\n", job


def wait_for_refusal(agent: Agent) -> str:
    """The agent's log once it says that it could not connect, and the TLS error why."""
    def refused() -> str | None:
        text = agent.log()
        return text if "[SSL: " in text and ("could not connect" in text or "disconnected from" in text) else None

    return wait_until(refused, WAIT, f"{agent.name} to log a TLS error and the failed connection")


# --- HTTPS --------------------------------------------------------------------------------


def test_the_api_over_https_trusts_only_its_ca(launch: Launcher, pki: ThrowawayCa, tmp_path: Path) -> None:
    service = launch.service(extra=https_flags(pki), https=pki.context())
    assert service.base_url.startswith("https://")
    assert service.api.ok("GET", "/v1/health")["Status"] == "ok"
    assert service.api.workflow("true")  # a token travels, and the answer comes back
    plain = Api(f"http://127.0.0.1:{service.http_port}", service.api.token)
    with pytest.raises((OSError, http.client.HTTPException)):
        plain.request("GET", "/v1/workflow")
    for stranger in (ssl.create_default_context(), ThrowawayCa(tmp_path / "other").context()):
        with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
            Api(service.base_url, service.api.token, stranger).request("GET", "/v1/workflow")


@pytest.mark.parametrize("flags, named", [
    (("--tls-cert", "/nonexistent/api.crt", "--tls-key", "/nonexistent/api.key"), "--tls-cert / OTA_BRIDGE_TLS_CERT"),
    (("--tls-cert", "{cert}"), "--tls-key / OTA_BRIDGE_TLS_KEY"),
    (("--tls-cert", "{key}", "--tls-key", "{key}"), "not a PEM certificate"),
])
def test_a_bad_certificate_setting_stops_the_service_in_one_line(
        pki: ThrowawayCa, tmp_path: Path, flags: tuple[str, ...], named: str) -> None:
    argv = [f.format(cert=pki.server.cert, key=pki.server.key) for f in flags]
    done = subprocess.run([sys.executable, "-m", "ota_bridge", "serve", "--data-dir", str(tmp_path / "data"),
                           "--http", f"127.0.0.1:{free_port()}", "--mqtt-listen", f"127.0.0.1:{free_port()}", *argv],
                          capture_output=True, text=True, cwd=REPO, timeout=WAIT)
    assert done.returncode == 2
    assert done.stderr.startswith("ota-bridge: ") and done.stderr.count("\n") == 1, done.stderr
    assert named in done.stderr


# --- Mosquitto ----------------------------------------------------------------------------


@pytest.mark.mosquitto
def test_the_whole_path_over_tls_on_mosquitto(launch: Launcher, pki: ThrowawayCa, tmp_path: Path) -> None:
    """The service and an agent on Mosquitto's TLS listener; a certificate for another host is refused."""
    port, misnamed_port = free_port(), free_port()
    misnamed = pki.server_certificate("misnamed", (x509.DNSName("elsewhere.invalid"),))
    lines = [*tls_listener(port, pki.ca_file, pki.server.cert, pki.server.key),
             *tls_listener(misnamed_port, pki.ca_file, misnamed.cert, misnamed.key)]
    ca = ("--ca-file", str(pki.ca_file))
    with secure_mosquitto(tmp_path, lines) as (_broker, flags):
        service = launch.service(mqtt_url=f"mqtts://127.0.0.1:{port}",
                                 extra=(*flags, "--mqtt-ca-file", str(pki.ca_file)))
        agent = launch.agent(service, "dev1", service.api.device("dev1"), *ca)
        run_job(service, "dev1", "over-tls")
        astray = launch.agent(service, "dev2", service.api.device("dev2"), *ca,
                              broker_url=f"mqtts://127.0.0.1:{misnamed_port}")
        assert "IP address mismatch" in wait_for_refusal(astray)
    assert f"connected to mqtts://127.0.0.1:{port}" in agent.log()


@pytest.mark.mosquitto
def test_mosquitto_requiring_a_client_certificate(launch: Launcher, pki: ThrowawayCa, tmp_path: Path) -> None:
    """The service and dev1 present certificates from the CA and get in; dev2 presents none and does not."""
    port = free_port()
    service_cert, dev1_cert = pki.client("ota-bridge-service"), pki.client("dev1")
    lines = tls_listener(port, pki.ca_file, pki.server.cert, pki.server.key, require_certificate=True)
    ca = ("--ca-file", str(pki.ca_file))
    with secure_mosquitto(tmp_path, lines) as (_broker, flags):
        service = launch.service(mqtt_url=f"mqtts://127.0.0.1:{port}", extra=(
            *flags, "--mqtt-ca-file", str(pki.ca_file), "--mqtt-cert", str(service_cert.cert),
            "--mqtt-key", str(service_cert.key)))
        api = service.api
        launch.agent(service, "dev1", api.device("dev1"), *ca, "--cert-file", str(dev1_cert.cert),
                     "--key-file", str(dev1_cert.key))
        run_job(service, "dev1", "with-a-certificate")
        refused = launch.agent(service, "dev2", api.device("dev2"), *ca)
        wait_for_refusal(refused)
        job = api.submit(api.workflow("true"), DeviceId="dev2")
        assert api.ok("GET", f"/v1/job/{job}")["Status"] == "QUEUED"
        assert "connected to mqtts://" not in refused.log()
        assert api.ok("GET", "/v1/device/dev2")["Online"] is False


# --- the embedded broker ------------------------------------------------------------------


def test_the_embedded_brokers_tls_listener(launch: Launcher, pki: ThrowawayCa) -> None:
    """Agents reach the embedded broker over TLS, with or without a client certificate of their own."""
    port, dev2_cert = free_port(), pki.client("dev2")
    service = launch.service(extra=(*https_flags(pki), "--mqtt-tls-listen", f"127.0.0.1:{port}"),
                             https=pki.context())
    api, url, ca = service.api, f"mqtts://127.0.0.1:{port}", ("--ca-file", str(pki.ca_file))
    launch.agent(service, "dev1", api.device("dev1"), *ca, broker_url=url)
    launch.agent(service, "dev2", api.device("dev2"), *ca, "--cert-file", str(dev2_cert.cert),
                 "--key-file", str(dev2_cert.key), broker_url=url)
    run_job(service, "dev1", "embedded-tls")
    run_job(service, "dev2", "embedded-tls-with-a-certificate")
