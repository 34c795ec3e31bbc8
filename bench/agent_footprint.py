"""The agent's footprint beside a bare paho device's, same broker, same run (issue 8, goal 5).

    .venv/bin/python bench/agent_footprint.py [--rounds 7] [--settle 2]

Starts Mosquitto (the repo's config, open to anonymous clients) and, round after round, one
real `ota-agent` and one bare paho device (a script that imports paho, connects and publishes
its retained presence "online", nothing else), both as fresh `python` processes. A watcher
subscribed to the presence topics notes when each "online" arrives. Printed, as medians over
the rounds:

- exec until online: from just before the process is started to the broker delivering its
  presence "online" to the watcher;
- CPU until online: the process's user + system CPU (/proc/PID/stat) when its "online" arrived,
  steadier than the wall time on a busy machine;
- idle RSS: the process's VmRSS (/proc/PID/status) `--settle` seconds after it was online.

Both run with bytecode caching on, into one cache directory of the run (PYTHONPYCACHEPREFIX;
PYTHONDONTWRITEBYTECODE is dropped): the warm-up round compiles what each imports, as
installing a package does. Without it, an agent run from a source tree compiles its own modules
on every start while paho's come precompiled from pip, about 85 ms of the agent's start-up here.

Nothing is signed for the agent (no service runs): it waits idle for a head, as it does on a
quiet fleet. Ratios agent / bare; the goal is at most 1.05 (RSS) and 1.2 (time).
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import fleet  # puts the repo on sys.path
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import Topics
from ota_bridge import signing
from tests.support.mosquitto import start_mosquitto

# The bare device: what any paho program must do to say it is online, and no more.
BARE_DEVICE = """
import json, sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
port, device_id, topic = int(sys.argv[1]), sys.argv[2], sys.argv[3]
client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=False,
                     protocol=mqtt.MQTTv311)
client.username_pw_set(device_id, "x")
client.will_set(topic, json.dumps({"Presence": "offline"}), qos=1, retain=True)
client.on_connect = lambda c, *a: c.publish(topic, json.dumps({"Presence": "online"}), qos=1, retain=True)
client.connect("127.0.0.1", port)
client.loop_forever()
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Watcher:
    """A paho client subscribed to every device's presence: puts (device id, arrival time) on a queue."""

    def __init__(self, port: int) -> None:
        self.topics = Topics()
        self.online: queue.Queue[tuple[str, float]] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="footprint-watcher")
        self.client.on_message = self._on_message
        subscribed: queue.Queue[bool] = queue.Queue()
        self.client.on_subscribe = lambda *_: subscribed.put(True)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(self.topics.all_devices(Topics.PRESENCE), qos=1)
        subscribed.get(timeout=10)

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        parsed = self.topics.parse(msg.topic)
        if parsed and b'"online"' in msg.payload and not msg.retain:
            self.online.put((parsed[0], time.perf_counter()))

    def wait_online(self, device_id: str, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while True:
            who, when = self.online.get(timeout=max(0.01, deadline - time.monotonic()))
            if who == device_id:
                return when

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def one_run(argv: list[str], device_id: str, watcher: Watcher, settle: float, log: Path,
            cwd: Path, env: dict[str, str]) -> tuple[float, int, float]:
    """(seconds from exec to online, idle RSS in KiB, CPU seconds until online) of one fresh process."""
    with log.open("ab") as out:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    try:
        online = watcher.wait_online(device_id)
        cpu = cpu_seconds(process.pid)
        time.sleep(settle)
        return online - start, rss_kib(process.pid), cpu
    finally:
        process.terminate()
        process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--agent-root", type=Path, default=fleet.REPO,
                        help="run `python -m agent` from this directory (e.g. an export of an older commit)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds online before RSS is read")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ota-bench-") as tmp, start_mosquitto(Path(tmp)) as broker:
        work = Path(tmp)
        (work / "keys").mkdir()
        signing.load_or_create(work / "keys")
        key_file = signing.key_files(work / "keys")[1]
        watcher = Watcher(broker.port)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        results: dict[str, list[tuple[float, int, float]]] = {"agent": [], "bare": []}
        try:
            for n in range(args.rounds + 1):  # round 0 warms the page cache, and is dropped
                agent_id, bare_id = f"agent-{n}", f"bare-{n}"
                agent = [sys.executable, "-m", "agent", "--broker", broker.url, "--device-id", agent_id,
                         "--password", "x", "--state-dir", str(work / agent_id), "--server-key-file", str(key_file)]
                bare = [sys.executable, "-c", BARE_DEVICE, str(broker.port), bare_id, Topics().presence(bare_id)]
                runs = [("agent", agent, agent_id, args.agent_root), ("bare", bare, bare_id, fleet.REPO)]
                for kind, argv, device_id, cwd in runs if n % 2 else runs[::-1]:
                    measured = one_run(argv, device_id, watcher, args.settle, work / f"{kind}.log", cwd, env)
                    if n:
                        results[kind].append(measured)
        finally:
            watcher.stop()
    report(results)


def report(results: dict[str, list[tuple[float, int, float]]]) -> None:
    med = {kind: tuple(statistics.median(r[i] for r in runs) for i in range(3)) for kind, runs in results.items()}
    for kind, (seconds, kib, cpu) in med.items():
        print(f"{kind:6} exec until online {seconds * 1000:6.1f} ms   CPU until online {cpu * 1000:4.0f} ms   "
              f"idle RSS {kib / 1024:5.1f} MiB   "
              f"(median of {len(results[kind])}; times {', '.join(f'{r[0] * 1000:.0f}' for r in results[kind])})")
    print(f"ratio agent / bare: exec until online {med['agent'][0] / med['bare'][0]:.2f} (goal <= 1.2), "
          f"CPU until online {med['agent'][2] / med['bare'][2]:.2f}, "
          f"idle RSS {med['agent'][1] / med['bare'][1]:.3f} (goal <= 1.05)")
    agent, bare = med["agent"], med["bare"]
    fleet.result("agent-exec-until-online", agent[0] * 1000, "ms", bare[0] * 1000, agent[0] / bare[0], "ratio <= 1.2")
    fleet.result("agent-idle-rss", agent[1] / 1024, "MiB", bare[1] / 1024, agent[1] / bare[1], "ratio <= 1.05")
    print(f"python {sys.version.split()[0]}, paho-mqtt {metadata.version('paho-mqtt')}, "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
