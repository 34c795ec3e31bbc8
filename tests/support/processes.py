"""Real processes for integration tests: the ota-bridge service and ota-agent daemons.

Each is started as its own OS process from this checkout, with its own ports and directories,
and every wait is bounded, so a stuck process fails its test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tests.support.mosquitto import free_port

REPO = Path(__file__).resolve().parents[2]


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll condition until it returns something truthy; fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTA_BRIDGE_", "OTA_AGENT_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Process:
    """A child process whose output goes to a log file that failures can show."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name, self.argv, self.log_path = name, argv, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code, self.proc = self.proc.returncode, None
        return code

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would."""
        self.stop(signal.SIGKILL)


@dataclass
class Response:
    status: int
    body: Any
    headers: dict[str, str]


class Api:
    """A tiny REST client over urllib, so tests need nothing the service does not.

    For an https:// base, context says whom to trust (tests.support.tls.ThrowawayCa.context()).
    """

    def __init__(self, base: str, token: str | None, context: ssl.SSLContext | None = None) -> None:
        self.base, self.token, self.context = base, token, context

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                token: str | None = "default") -> Response:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"}
        token = self.token if token == "default" else token
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.context) as resp:
                return Response(resp.status, _json(resp.read()), dict(resp.headers))
        except urllib.error.HTTPError as e:
            return Response(e.code, _json(e.read()), dict(e.headers))

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        resp = self.request(method, path, body)
        assert resp.status in (200, 201), f"{method} {path} -> {resp.status} {resp.body}"
        return resp.body

    def workflow(self, command: str, name: str = "wf", **extra: Any) -> str:
        return self.ok("POST", "/v1/workflow", {"Name": name, "Command": command, **extra})["WorkflowId"]

    def device(self, device_id: str, group: str | None = None, tags: list[str] | None = None) -> str:
        body = self.ok("POST", "/v1/device", {"DeviceId": device_id, "DeviceGroup": group, "Tags": tags or []})
        return body["MqttPassword"]

    def submit(self, workflow_id: str, name: str = "job", **target: Any) -> str:
        return self.ok("POST", "/v1/job", {"Name": name, "WorkflowId": workflow_id, **target})["JobId"]

    def wait_job(self, job_id: str, timeout: float = 30, final: bool = True) -> dict[str, Any]:
        finals = {"SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED", "INTERRUPTED", "REJECTED"}

        def done() -> dict[str, Any] | None:
            job = self.ok("GET", f"/v1/job/{job_id}")
            return job if (job["Status"] in finals) == final else None

        return wait_until(done, timeout, f"job {job_id} to finish")


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode(errors="replace")


class Service(Process):
    """`ota-bridge serve` with its own data dir and ports; the embedded broker unless mqtt_url.

    With https (a client context trusting the service's certificate; --tls-cert and --tls-key in
    extra), the tests reach the API over HTTPS.
    """

    def __init__(self, workdir: Path, mqtt_url: str | None = None, database: str | None = None,
                 extra: tuple[str, ...] = (), https: ssl.SSLContext | None = None) -> None:
        self.data_dir = workdir / "service-data"
        self.http_port, self.mqtt_port = free_port(), free_port()
        self.mqtt_url, self.https = mqtt_url, https
        argv = [sys.executable, "-m", "ota_bridge", "serve", "--data-dir", str(self.data_dir),
                "--http", f"127.0.0.1:{self.http_port}", "--mqtt-listen", f"127.0.0.1:{self.mqtt_port}", *extra]
        if mqtt_url:
            argv += ["--mqtt-url", mqtt_url]
        if database:
            argv += ["--database", database]
        super().__init__("service", argv, workdir / "service.log")
        self._api: Api | None = None

    @property
    def broker_url(self) -> str:
        return self.mqtt_url or f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def signing_key_file(self) -> Path:
        """The public key agents verify this service's jobs with (written on its first start)."""
        return self.data_dir / "job-signing.pub"

    @property
    def base_url(self) -> str:
        return f"{'https' if self.https else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def api(self) -> Api:
        if self._api is None:
            token = (self.data_dir / "admin-token").read_text().strip()
            self._api = Api(self.base_url, token, self.https)
        return self._api

    def start(self, timeout: float = 30) -> None:
        super().start()
        health = Api(self.base_url, None, self.https)

        def ready() -> bool:
            if not self.running:
                raise AssertionError(f"the service exited:\n{self.log()}")
            try:
                return health.request("GET", "/v1/health").body["BrokerConnected"] is True
            except (OSError, TypeError, KeyError):
                return False

        wait_until(ready, timeout, f"the service to be ready; log:\n{self.log()}")


class Agent(Process):
    """A real `ota-agent` daemon for one device.

    It trusts server_key_file (the service's `job-signing.pub`), unless extra names a key itself.
    """

    def __init__(self, workdir: Path, device_id: str, password: str, broker_url: str, *extra: str,
                 server_key_file: Path | None = None) -> None:
        self.device_id = device_id
        self.state_dir = workdir / f"agent-{device_id}"
        argv = [sys.executable, "-m", "agent", "--broker", broker_url, "--device-id", device_id,
                "--password", password, "--state-dir", str(self.state_dir), *extra]
        if server_key_file is not None and not any(a.startswith("--server-key") for a in extra):
            argv += ["--server-key-file", str(server_key_file)]
        super().__init__(f"agent {device_id}", argv, workdir / f"agent-{device_id}.log")
