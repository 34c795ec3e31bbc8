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

`--bound 20000` waits, as the service's link does (MAX_OUTSTANDING), while that many are
unacknowledged: then every message arrives. The CPU time it prints shows what paho's in-flight
window costs: on each PUBACK paho walks its unacknowledged messages from the oldest to the first
one still queued (`_update_inflight`), about `--max-inflight` steps, so a QoS 1 publish costs
more CPU with a window of 1,000 than with none (`--max-inflight 0`, paho's "unlimited").
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import fleet  # noqa: F401 - puts the repo on sys.path
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.mosquitto import start_mosquitto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--max-inflight", type=int, default=1000, help="paho's window (0: unlimited)")
    parser.add_argument("--bound", type=int, default=0, help="wait while this many are unacknowledged (0: never)")
    args = parser.parse_args()
    count = args.messages
    with tempfile.TemporaryDirectory(prefix="ota-bench-") as tmp, \
            start_mosquitto(Path(tmp), ["max_queued_messages 1000000"]) as broker:
        acked: list[int] = []
        all_acked = threading.Event()

        def on_publish(_c: object, _u: object, mid: int, _rc: object, _p: object) -> None:
            acked.append(mid)
            if len(acked) == count:
                all_acked.set()

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="mid-wrap")
        client.max_inflight_messages_set(args.max_inflight)
        client.on_publish = on_publish
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        cpu, start = time.process_time(), time.perf_counter()
        for i in range(count):
            while args.bound and len(client._out_messages) >= args.bound:  # as BrokerLink.room() does
                time.sleep(0.005)
            client.publish(f"wrap/{i}", b"x" * 100, qos=1, retain=True)
        all_acked.wait(60)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - start
        held = subprocess.run(f"timeout 15 mosquitto_sub -p {broker.port} -t 'wrap/#' -v | wc -l", shell=True,
                              capture_output=True, text=True).stdout.strip()
        client.disconnect()
        client.loop_stop()
    print(f"published {count} retained QoS 1 messages: {len(acked)} acknowledged, the broker holds {held}; "
          f"max_inflight {args.max_inflight}, bound {args.bound or 'none'}: this process's CPU {cpu:.2f} s "
          f"({cpu / count * 1e6:.0f} us a message), {wall:.1f} s")


if __name__ == "__main__":
    main()
