"""The agent runs on small boards: it may import only the standard library, paho and itself."""

import ast
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support.mosquitto import start_mosquitto

AGENT_DIR = Path(__file__).resolve().parents[1] / "agent"
ALLOWED = set(sys.stdlib_module_names) | {"paho", "agent"}


def top_level_imports(path: Path) -> set[str]:
    """Top-level module names of every absolute import in one file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


AGENT_FILES = sorted(AGENT_DIR.glob("*.py"))


def test_the_agent_package_has_modules():
    expected = {"protocol.py", "settings.py", "head.py", "job_signature.py", "link.py", "journal.py", "runner.py",
                "daemon.py"}
    assert expected <= {p.name for p in AGENT_FILES}


@pytest.mark.parametrize("path", AGENT_FILES, ids=lambda p: p.name)
def test_agent_module_imports_only_stdlib_paho_and_agent(path):
    assert top_level_imports(path) - ALLOWED == set()


@pytest.mark.parametrize("path", AGENT_FILES, ids=lambda p: p.name)
def test_only_the_link_talks_to_paho(path):
    """agent/link.py owns the broker: no other agent module imports paho."""
    assert ("paho" in top_level_imports(path)) == (path.name == "link.py")


def test_the_import_check_catches_a_third_party_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import json\nfrom pydantic import BaseModel\nfrom . import protocol\n")
    assert top_level_imports(bad) - ALLOWED == {"pydantic"}


# --- what an idle agent leaves unimported (issue 8, goal 5: its footprint beside a bare paho device) ---

# Imported where first needed, never by an agent that only connects and waits for a head.
LAZY_MODULES = {
    "agent.download": "the first job with Artifacts (agent/daemon.py, Agent._start_download)",
    "subprocess": "a held shell posix_spawn cannot start (agent/runner.py, _popen; agent/spawn.py)",
    "agent.spawn": "the first command, or the first standby shell (agent/runner.py)",
    "agent.worker": "the first command: the thread that runs the commands (agent/daemon.py, Agent._start_worker)",
    "agent.runner": "the first job head, or a command an earlier agent left running (agent/daemon.py)",
    "agent.head": "the first message on the job topic (agent/daemon.py, Agent._on_job_message)",
    "signal": "the first command (agent/runner.py); the agent sets its handlers with _signal",
    "argparse": "--help, --version or a command line only argparse reads (agent/settings.py, read_flags)",
    "queue": "nothing: the agent's events go through agent/link.py's EventQueue",
    "ctypes": "the first signed head, to load OpenSSL's verifier (agent/job_signature.py, verifier): ~0.57 MiB",
    "agent.ed25519_openssl": "the first signed head (agent/job_signature.py, verifier)",
}
# Runs the real agent (`python -m agent`'s main) and, as it exits, writes what it had loaded.
IDLE_AGENT = """
import atexit, json, sys
def report():
    from agent import ed25519
    with open(sys.argv[1], "w") as out:
        json.dump({"modules": sorted(sys.modules), "ed25519_tables": len(ed25519._BASE_TABLE)}, out)
atexit.register(report)
from agent.daemon import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def idle_agent(tmp_path_factory):
    """What a real agent process had imported after connecting and subscribing, with no head to act on."""
    tmp = tmp_path_factory.mktemp("idle-agent")
    key = base64.b64encode(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_AGENT_")}
    env["PYTHONPATH"] = str(AGENT_DIR.parent)
    report, log = tmp / "report.json", tmp / "agent.log"
    with start_mosquitto(tmp) as broker, log.open("wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-c", IDLE_AGENT, str(report), "--broker", broker.url, "--device-id", "idle-1",
             "--password", "x", "--state-dir", str(tmp / "state"), "--server-key", key],
            cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while "subscribed to" not in log.read_text(errors="replace"):
                assert agent.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
                time.sleep(0.05)
            time.sleep(0.6)  # past SUBSCRIBE_SETTLE_SECONDS: the main loop has looked for a head to act on
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=20) == 0, log.read_text(errors="replace")
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    return json.loads(report.read_text())


@pytest.mark.mosquitto
@pytest.mark.parametrize("module", sorted(LAZY_MODULES))
def test_an_idle_agent_does_not_import(idle_agent, module):
    """Imported by what needs it (LAZY_MODULES says what), so an idle agent's RSS and start-up stay small."""
    assert "agent.daemon" in idle_agent["modules"]  # the report is the agent's own
    assert module not in idle_agent["modules"], f"{module} should wait for {LAZY_MODULES[module]}"


@pytest.mark.mosquitto
def test_an_idle_agent_builds_no_ed25519_table(idle_agent):
    """The fixed-base tables (~300 KiB each) wait for the first head to verify."""
    assert idle_agent["ed25519_tables"] == 0


@pytest.mark.mosquitto
def test_an_idle_agent_does_not_import_dataclasses(idle_agent):
    """dataclasses pulls in inspect, ast and dis (~0.8 MiB) and generates code for every class at start."""
    assert "dataclasses" not in idle_agent["modules"]


def test_the_idna_codec_is_loaded_before_paho_s_thread_resolves_the_broker():
    """Loaded first on paho's thread, the codec's tables would keep a malloc arena of ~0.25 MiB for that
    thread alone (bench/profile_notes.md, agent-idle-rss): agent/link.py imports it on the main thread."""
    code = "import sys, agent.link; print('encodings.idna' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=AGENT_DIR.parent)
    assert done.stdout.strip() == "True", done.stderr
