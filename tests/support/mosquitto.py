"""A real Mosquitto broker on an ephemeral port, for tests.

    with start_mosquitto(tmp_path) as broker:
        process, port = broker          # unpacks for simple tests
        ...
        broker.restart()                # stop and start again on the same port
        broker.kill(); broker.start()   # a crash (SIGKILL), then the same port again

The config is the repo's mosquitto.conf with its listener moved to the chosen port, plus
`user root` (as root, Mosquitto would otherwise drop to the `mosquitto` user; user= names the one
to drop to) and any extra lines. Mosquitto's output goes to a log file next to the config; a
broker that does not come up raises with that log in the message.

Without the mosquitto binary the test is skipped, except under CI=true, where it fails: CI
must run every Mosquitto test.
"""

from __future__ import annotations

import os
import queue
import random
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

REPO_ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO_CONF = REPO_ROOT / "mosquitto.conf"
DYNSEC_CONF = REPO_ROOT / "mosquitto-dynsec.conf"
DYNSEC_FILE = "dynamic-security.json"
LISTENER_LINE = "listener 1883 127.0.0.1"
START_SECONDS = 10.0
STOP_SECONDS = 5.0


def logs_in(port: int, username: str, password: str, client_id: str | None = None) -> bool:
    """Whether the broker on 127.0.0.1:port takes this login (client id: the username unless given)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or username)
    client.username_pw_set(username, password)
    codes: queue.Queue[mqtt.ReasonCode] = queue.Queue()
    client.on_connect = lambda _c, _u, _f, code, _p: codes.put(code)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        return not codes.get(timeout=10).is_failure
    finally:
        client.disconnect()
        client.loop_stop()


# Ports handed to servers come from below the kernel's ephemeral range (32768-60999 here), so no
# outgoing connection of this machine can take one between free_port() and the server's bind (a
# port bound to 0 comes from that range, where every client socket also gets its port). Each xdist
# worker has its own slice, and a process never hands out the same port twice.
PORT_RANGE = (20_000, 32_000)
_handed_out: set[int] = set()


def _worker_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker) if worker.isdigit() else 0
    width = (PORT_RANGE[1] - PORT_RANGE[0]) // max(count, 1)
    low = PORT_RANGE[0] + (index % max(count, 1)) * width
    return range(low, low + width)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and that no other test of this run was given."""
    ports = _worker_slice()
    start = random.randrange(len(ports))
    for step in range(len(ports)):
        port = ports[(start + step) % len(ports)]
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str:
    """The mosquitto executable; skips the test if missing (fails it under CI=true)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    found = shutil.which("mosquitto", path=search)
    if found:
        return found
    message = "the mosquitto binary is not installed (Debian package: mosquitto)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; under CI=true Mosquitto tests must run")
    pytest.skip(message)


ACCOUNTS_DIR = "/var/lib/ota-bridge/mosquitto"
# Lines the open variant leaves out: it lets anyone in, as a compromised or misconfigured broker would.
SECURE_ONLY = ("allow_anonymous", "password_file", "acl_file", "pid_file", "use_username_as_clientid")


def broker_config(port: int, extra_lines: Iterable[str] = (), accounts_dir: Path | None = None,
                  user: str = "root", conf: Path = MOSQUITTO_CONF) -> str:
    """The repo's mosquitto.conf, listening on `port`, running as `user`, plus extra lines.

    With accounts_dir, the file as shipped (logins and ACLs from the files ota-bridge writes there);
    without, an open variant: anonymous clients may do anything, as on a compromised broker.
    """
    text = conf.read_text(encoding="utf-8")
    lines = text.splitlines()
    if LISTENER_LINE not in lines or not any(ACCOUNTS_DIR in line for line in lines):
        raise RuntimeError(f"{conf} has no line {LISTENER_LINE!r} or {ACCOUNTS_DIR} to replace")
    lines = [f"listener {port} 127.0.0.1" if line == LISTENER_LINE else line for line in lines]
    if accounts_dir is None:
        lines = [line for line in lines if not line.startswith(SECURE_ONLY)] + ["allow_anonymous true"]
    else:
        lines = [line.replace(ACCOUNTS_DIR, str(accounts_dir)) for line in lines]
    return "\n".join([*lines, f"user {user}", *extra_lines, ""])


class Mosquitto:
    """One broker: a config file, a port that stays the same across restarts, a process."""

    def __init__(self, workdir: Path, port: int, extra_lines: Iterable[str] = (),
                 accounts_dir: Path | None = None, user: str = "root", conf: Path = MOSQUITTO_CONF) -> None:
        self.port = port
        self.binary = mosquitto_binary()
        self.accounts_dir = accounts_dir
        self.config_path = Path(workdir) / f"mosquitto-{port}.conf"
        self.log_path = Path(workdir) / f"mosquitto-{port}.log"
        self.config_path.write_text(broker_config(port, extra_lines, accounts_dir, user, conf),
                                    encoding="utf-8")
        self.process: subprocess.Popen[bytes] | None = None

    def __iter__(self) -> Iterator[object]:
        """Unpack as (process, port). After restart() the process is a new one: use .process."""
        return iter((self.process, self.port))

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_listening()

    def stop(self) -> None:
        """Terminate the broker (kill it if it lingers). Safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would: no will messages sent, no clean goodbyes. Safe to call twice."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self, *, crash: bool = False) -> None:
        """Stop (or, with crash=True, SIGKILL) and start again on the same port.

        Retained messages are lost either way: persistence is off.
        """
        if crash:
            self.kill()
        else:
            self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {START_SECONDS} s:\n{self.log_text()}")


@contextmanager
def start_mosquitto(tmp_path: Path, extra_lines: Iterable[str] = (), accounts_dir: Path | None = None,
                    user: str = "root", conf: Path = MOSQUITTO_CONF) -> Iterator[Mosquitto]:
    """Start a broker on a free port; it is stopped on exit, whatever happened."""
    broker = Mosquitto(tmp_path, free_port(), extra_lines, accounts_dir, user, conf)
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


BROKERS = ["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)]


@contextmanager
def broker_url(kind: str, tmp_path: Path) -> Iterator[tuple[str | None, tuple[str, ...]]]:
    """For tests parametrized over BROKERS: (the service's --mqtt-url, its extra flags).

    "embedded" is (None, ()): the service's own broker. "mosquitto" is Mosquitto as shipped,
    logins and ACLs included, kept in step with the service's registry.
    """
    if kind == "embedded":
        yield None, ()
    else:
        with secure_mosquitto(tmp_path) as (broker, flags):
            yield broker.url, flags


@contextmanager
def secure_mosquitto(workdir: Path, extra_lines: Iterable[str] = ()) -> Iterator[tuple[Mosquitto, tuple[str, ...]]]:
    """Mosquitto as shipped, with its accounts written by `ota-bridge mosquitto-config`, plus extra lines.

    Yields the broker and the flags that make a service (data dir workdir/service-data) keep
    those accounts in step with its registry.
    """
    accounts = workdir / "mosquitto-accounts"
    data_dir = workdir / "service-data"
    subprocess.run([sys.executable, "-m", "ota_bridge", "mosquitto-config", "--out", str(accounts),
                    "--data-dir", str(data_dir)], check=True, capture_output=True, timeout=60, cwd=REPO_ROOT)
    with start_mosquitto(workdir, extra_lines, accounts_dir=accounts) as broker:
        yield broker, ("--mosquitto-dir", str(accounts))


@contextmanager
def dynsec_mosquitto(workdir: Path) -> Iterator[tuple[Mosquitto, tuple[str, ...]]]:
    """mosquitto-dynsec.conf as shipped, its plugin's first file written by `ota-bridge
    mosquitto-dynsec-config` from the service's data dir (workdir/service-data): the broker, and the
    flag that makes the service keep the plugin's accounts in step with its registry."""
    accounts = workdir / "mosquitto-dynsec"
    accounts.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "ota_bridge", "mosquitto-dynsec-config", "--out", str(accounts / DYNSEC_FILE),
                    "--data-dir", str(workdir / "service-data")], check=True, capture_output=True, timeout=60,
                   cwd=REPO_ROOT)
    with start_mosquitto(workdir, accounts_dir=accounts, conf=DYNSEC_CONF) as broker:
        yield broker, ("--mosquitto-dynsec",)


def tls_listener(port: int, ca_file: Path, cert: Path, key: Path, require_certificate: bool = False) -> list[str]:
    """Config lines for a second listener, over TLS, on 127.0.0.1:port (the docs' example, on a test port).

    In Mosquitto 2.0 the lines after a `listener` line configure that listener, so these go last;
    use_username_as_clientid is one of them and must be repeated for it.
    """
    lines = [f"listener {port} 127.0.0.1", f"cafile {ca_file}", f"certfile {cert}", f"keyfile {key}",
             "tls_version tlsv1.2", "use_username_as_clientid true"]
    return lines + (["require_certificate true"] if require_certificate else [])
