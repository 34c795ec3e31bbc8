"""The agent's footprint beside a bare paho device's, same broker, same run (issue 8, goal 5).

    .venv/bin/python bench/agent_footprint.py [--rounds 7] [--starts 3] [--settle 2] [--instructions]

Starts Mosquitto (the repo's config, open to anonymous clients) and, round after round, real
`ota-agent`s and bare paho devices (a script that imports paho, connects and publishes its
retained presence "online", nothing else), each a fresh `python` process started as pip's
`ota-agent` script starts it. A round starts each kind `--starts` times, agent and bare in turn
(the order alternating from one pair to the next), one process at a time; the last start of each
kind in a round stays up `--settle` seconds for its RSS. A watcher subscribed to the presence
topics notes when each "online" arrives. Printed, as medians (times over every start, RSS over
the rounds):

- exec until online: from just before the process is started to the broker delivering its
  presence "online" to the watcher;
- CPU until online: the CPU time of the process's threads (/proc/PID/task/*/schedstat, in ns)
  when its "online" arrived, steadier than the wall time on a busy machine;
- idle RSS: the process's VmRSS (/proc/PID/status) `--settle` seconds after it was online;
- the median of the pairs' ratios (each agent start over the bare start beside it), a check on
  the ratio of the medians: on a busy machine the two should agree within a few percent.

With --instructions (needs valgrind), each kind then runs once more under callgrind, until the broker
acknowledges its "online" (PYTHONHASHSEED=0): the instructions of agent and bare, a ratio no load
moves.

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
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import fleet  # puts the repo on sys.path
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import Topics
from ota_bridge import signing
from tests.support.mosquitto import Mosquitto, start_mosquitto

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
# The agent, started as the `ota-agent` script pip installs starts it (deploy/ota-agent.service runs that).
AGENT = "import sys\nfrom agent.daemon import main\nsys.exit(main())"
# For --instructions: both exit when the broker acknowledges their first publication, the "online".
EXIT_AT_PUBACK = "client.on_publish = lambda *_: __import__('os')._exit(0)\n"
BARE_UNTIL_ONLINE = BARE_DEVICE.replace("client.connect(", EXIT_AT_PUBACK + "client.connect(")
AGENT_UNTIL_ONLINE = f"""
from agent import link
make_client = link.BrokerLink._make_client
def exit_at_puback(self):
    client = make_client(self)
    {EXIT_AT_PUBACK}    return client
link.BrokerLink._make_client = exit_at_puback
{AGENT}
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """CPU time of the process's threads so far: schedstat's nanoseconds, else /proc/PID/stat's ticks."""
    try:
        return sum(int((task / "schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError, IndexError):
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


class Start(NamedTuple):
    seconds: float  # exec until online
    cpu: float  # CPU seconds until online
    kib: int | None  # idle RSS, for a start that settled


def one_start(argv: list[str], device_id: str, watcher: Watcher, settle: float | None, log: Path,
              cwd: Path, env: dict[str, str]) -> Start:
    """One fresh process, until online (and `settle` seconds more, for its RSS, unless None)."""
    with log.open("ab") as out:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    try:
        online = watcher.wait_online(device_id)
        cpu = cpu_seconds(process.pid)
        if settle is None:
            return Start(online - start, cpu, None)
        time.sleep(settle)
        return Start(online - start, cpu, rss_kib(process.pid))
    finally:
        process.terminate()
        process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--starts", type=int, default=3,
                        help="starts of each kind per round, for the times; the last one settles for the RSS")
    parser.add_argument("--agent-root", type=Path, default=fleet.REPO,
                        help="run the agent from this directory (e.g. an export of an older commit)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds online before RSS is read")
    parser.add_argument("--instructions", action="store_true",
                        help="also count each kind's instructions until online (valgrind --tool=callgrind)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ota-bench-") as tmp, start_mosquitto(Path(tmp)) as broker:
        work = Path(tmp)
        (work / "keys").mkdir()
        signing.load_or_create(work / "keys")
        key_file = signing.key_files(work / "keys")[1]
        watcher = Watcher(broker.port)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        pairs: list[dict[str, Start]] = []
        try:
            for n in range(args.rounds + 1):  # round 0 compiles and warms the page cache, and is dropped
                for s in range(args.starts):
                    settle = args.settle if s == args.starts - 1 else None
                    pair = one_pair(broker, key_file, watcher, work, env, args.agent_root, f"{n}-{s}",
                                    settle, agent_first=(n * args.starts + s) % 2 == 1)
                    if n:
                        pairs.append(pair)
            instructions = count_instructions(broker, key_file, work, env, args.agent_root) if args.instructions else {}
        finally:
            watcher.stop()
    report(pairs, instructions)


def count_instructions(broker: Mosquitto, key_file: Path, work: Path, env: dict[str, str],
                       agent_root: Path) -> dict[str, int]:
    """Each kind's instructions from exec until its "online" is acknowledged, under callgrind."""
    counts = {}
    for kind, code, argv, cwd in [
        ("agent", AGENT_UNTIL_ONLINE, ["--broker", broker.url, "--device-id", "agent-counted", "--password", "x",
                                       "--state-dir", str(work / "agent-counted"), "--server-key-file", str(key_file)],
         agent_root),
        ("bare", BARE_UNTIL_ONLINE, [str(broker.port), "bare-counted", Topics().presence("bare-counted")], fleet.REPO),
    ]:
        done = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c",
                               code, *argv], cwd=cwd, env={**env, "PYTHONHASHSEED": "0"}, capture_output=True,
                              text=True, timeout=600)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode != 0 or found is None:
            raise RuntimeError(f"callgrind of the {kind} failed: {done.stderr[-2000:]}")
        counts[kind] = int(found.group(1))
    return counts


def one_pair(broker: Mosquitto, key_file: Path, watcher: Watcher, work: Path, env: dict[str, str], agent_root: Path,
             tag: str, settle: float | None, agent_first: bool) -> dict[str, Start]:
    """One agent start and one bare start, one after the other."""
    agent_id, bare_id = f"agent-{tag}", f"bare-{tag}"
    agent = [sys.executable, "-c", AGENT, "--broker", broker.url, "--device-id", agent_id,
             "--password", "x", "--state-dir", str(work / agent_id), "--server-key-file", str(key_file)]
    bare = [sys.executable, "-c", BARE_DEVICE, str(broker.port), bare_id, Topics().presence(bare_id)]
    runs = [("agent", agent, agent_id, agent_root), ("bare", bare, bare_id, fleet.REPO)]
    return {kind: one_start(argv, device_id, watcher, settle, work / f"{kind}.log", cwd, env)
            for kind, argv, device_id, cwd in (runs if agent_first else runs[::-1])}


def report(pairs: list[dict[str, Start]], instructions: dict[str, int]) -> None:
    med: dict[str, dict[str, float]] = {}
    for kind in ("agent", "bare"):
        starts = [pair[kind] for pair in pairs]
        med[kind] = {"seconds": statistics.median(s.seconds for s in starts),
                     "cpu": statistics.median(s.cpu for s in starts),
                     "kib": statistics.median(s.kib for s in starts if s.kib is not None)}
        print(f"{kind:6} exec until online {med[kind]['seconds'] * 1000:6.1f} ms   "
              f"CPU until online {med[kind]['cpu'] * 1000:5.1f} ms   idle RSS {med[kind]['kib'] / 1024:5.2f} MiB   "
              f"(medians of {len(starts)} starts, RSS of {sum(s.kib is not None for s in starts)}; "
              f"times {', '.join(f'{s.seconds * 1000:.0f}' for s in starts)})")
    agent, bare = med["agent"], med["bare"]
    pair_time = statistics.median(p["agent"].seconds / p["bare"].seconds for p in pairs)
    pair_cpu = statistics.median(p["agent"].cpu / p["bare"].cpu for p in pairs)
    time_ratio, cpu_ratio, rss_ratio = (agent[k] / bare[k] for k in ("seconds", "cpu", "kib"))
    print(f"ratio agent / bare: exec until online {time_ratio:.2f} (goal <= 1.2; median of the pairs' ratios "
          f"{pair_time:.2f}), CPU until online {cpu_ratio:.2f} (pairs {pair_cpu:.2f}), "
          f"idle RSS {rss_ratio:.3f} (goal <= 1.05)")
    counted = {}
    if instructions:
        counted = {"instructions_ratio": round(instructions["agent"] / instructions["bare"], 3)}
        print(f"instructions until online (callgrind): agent {instructions['agent'] / 1e6:.1f} M, "
              f"bare {instructions['bare'] / 1e6:.1f} M, ratio {counted['instructions_ratio']:.3f}")
    fleet.result("agent-exec-until-online", agent["seconds"] * 1000, "ms", bare["seconds"] * 1000, time_ratio,
                 "ratio <= 1.2", starts=len(pairs), median_pair_ratio=round(pair_time, 3),
                 cpu_ratio=round(cpu_ratio, 3), **counted)
    fleet.result("agent-idle-rss", agent["kib"] / 1024, "MiB", bare["kib"] / 1024, rss_ratio, "ratio <= 1.05",
                 rounds=sum(p["agent"].kib is not None for p in pairs))
    print(f"python {sys.version.split()[0]}, paho-mqtt {metadata.version('paho-mqtt')}, "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
