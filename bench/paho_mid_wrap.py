"""paho loses QoS 1 publishes when more than 65,535 wait for their PUBACK at once.

    .venv/bin/python bench/paho_mid_wrap.py [--messages 100000]

A paho client (max_inflight 1000; the service's link sets no window, the same here) publishes N
retained QoS 1 messages as fast as it can, on a Mosquitto of its own; then a subscriber counts the retained messages
the broker holds. paho numbers messages 1..65535 and wraps around without checking whether a
number is still in use, and keeps unacknowledged messages in a dict keyed by that number
(`_out_messages[mid] = message`): past 65,535 outstanding, each new message replaces an older
one that was never sent. No error, no log line, no on_publish for the lost ones.

The service hits this when it hands the broker link two messages (head and queue) per device
for more than about 32,767 devices at once: the republish after a restart, or a group job
over that many. bench/RESULTS.md (fleet simulator, 100,000 devices) shows it.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import fleet  # noqa: F401 - puts the repo on sys.path
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.mosquitto import start_mosquitto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    count = parser.parse_args().messages
    with tempfile.TemporaryDirectory(prefix="ota-bench-") as tmp, \
            start_mosquitto(Path(tmp), ["max_queued_messages 1000000"]) as broker:
        acked: list[int] = []
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="mid-wrap")
        client.max_inflight_messages_set(1000)
        client.on_publish = lambda _c, _u, mid, _rc, _p: acked.append(mid)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        for i in range(count):
            client.publish(f"wrap/{i}", b"x" * 100, qos=1, retain=True)
        deadline = time.monotonic() + 60
        while len(acked) < count and time.monotonic() < deadline:
            time.sleep(0.5)
        held = subprocess.run(f"timeout 15 mosquitto_sub -p {broker.port} -t 'wrap/#' -v | wc -l", shell=True,
                              capture_output=True, text=True).stdout.strip()
        client.disconnect()
        client.loop_stop()
    print(f"published {count} retained QoS 1 messages: {len(acked)} acknowledged, the broker holds {held}")


if __name__ == "__main__":
    main()
