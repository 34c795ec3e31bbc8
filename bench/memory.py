"""The service's memory per device and per queued child job, as a ratio of its own empty size.

    .venv/bin/python bench/memory.py [--devices 2000] [--mosquitto]

One service (the embedded broker, or Mosquitto with --mosquitto). Its resident set (VmRSS in
/proc/PID/status) is read three times in the same run: with 0 devices (the baseline), after
registering N devices in one group, and after 2 group jobs over them are queued and published.
Nothing answers the jobs, so every child stays queued. Each reading waits for the RSS to settle.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from fleet import GROUP, register_fleet, result  # first: puts the repo on sys.path

from tests.support.mosquitto import start_mosquitto
from tests.support.processes import Service

JOBS = 2
SETTLE_SECONDS = 1.0  # the RSS must stay within SETTLE_SHARE for this long
SETTLE_SHARE = 0.005
SETTLE_LIMIT = 20.0
MIB = 1024 * 1024


def status_field(pid: int, name: str) -> int:
    """A size field of /proc/PID/status (e.g. VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"{name} is not in /proc/{pid}/status")


def settled_rss(pid: int) -> int:
    """VmRSS once it has stopped moving (or after SETTLE_LIMIT seconds)."""
    deadline = time.monotonic() + SETTLE_LIMIT
    steady_since, last = time.monotonic(), status_field(pid, "VmRSS")
    while time.monotonic() - steady_since < SETTLE_SECONDS and time.monotonic() < deadline:
        time.sleep(0.1)
        now = status_field(pid, "VmRSS")
        if abs(now - last) > last * SETTLE_SHARE:
            steady_since, last = time.monotonic(), now
    return last


def start_service(workdir: Path, stack: ExitStack, mosquitto: bool) -> tuple[Service, int | None]:
    """The service, and the broker's pid when it is Mosquitto; both stopped by the stack."""
    broker = stack.enter_context(start_mosquitto(workdir)) if mosquitto else None
    service = Service(workdir, mqtt_url=broker.url if broker else None)
    stack.callback(service.stop)
    service.start()
    return service, broker.process.pid if broker else None


def measure(service: Service, broker_pid: int | None, devices: int, name: str) -> None:
    api, pid = service.api, service.proc.pid
    readings = {"0 devices": settled_rss(pid)}
    broker_before = settled_rss(broker_pid) if broker_pid else 0
    print(f"registered {devices} devices in {register_fleet(api, devices):.1f} s")
    readings[f"{devices} devices"] = settled_rss(pid)
    workflow_id = api.workflow("true", name="bench")
    for i in range(JOBS):
        api.submit(workflow_id, f"bench-{i}", DeviceGroup=GROUP)
    readings[f"+ {JOBS * devices} queued children"] = settled_rss(pid)
    report(readings, devices, status_field(pid, "VmHWM"), name)
    if broker_pid:
        print(f"mosquitto RSS growth:  {(settled_rss(broker_pid) - broker_before) / MIB:.1f} MiB")


def report(readings: dict[str, int], devices: int, peak: int, name: str) -> None:
    baseline, registered, queued = readings.values()
    for label, rss in readings.items():
        print(f"service RSS, {label + ':':24} {rss / MIB:7.1f} MiB")
    print(f"service peak RSS (VmHWM):{'':12} {peak / MIB:7.1f} MiB")
    print(f"bytes per device:          {(registered - baseline) / devices:8.0f}")
    print(f"bytes per queued child:    {(queued - registered) / (JOBS * devices):8.0f}")
    print(f"ratio RSS with {devices} devices and {JOBS} jobs / RSS with 0 devices: {queued / baseline:.2f}")
    result(f"{name}-per-device", (registered - baseline) / devices, "B", ratio=registered / baseline, devices=devices)
    result(f"{name}-per-queued-child", (queued - registered) / (JOBS * devices), "B", ratio=queued / baseline,
           devices=devices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000, help="devices to register (default 2000)")
    parser.add_argument("--mosquitto", action="store_true", help="use Mosquitto instead of the embedded broker")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ota-bench-") as workdir, ExitStack() as stack:
        service, broker_pid = start_service(Path(workdir), stack, args.mosquitto)
        measure(service, broker_pid, args.devices, "memory-mosquitto" if args.mosquitto else "memory-embedded")


if __name__ == "__main__":
    main()
