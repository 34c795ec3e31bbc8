"""A group job over 10 online devices: from POST until GET says final, against a bare round trip.

    .venv/bin/python bench/group_latency.py [--devices 10] [--runs 7] [--broker embedded|mosquitto|both]
                                            [--poll] [--gap 0]

For each broker: the service, N registered devices in one group, one real `ota-agent` for each,
all subscribed. Then, one run after another: POST /v1/job (workflow `date`, DeviceGroup) and
GET /v1/job/{id}?WaitSeconds=30, which the service answers once the job is final (with --poll:
plain GETs as fast as they are answered, until one says final); the figure is the median of the
runs. --gap waits that many seconds between runs (default 0: each POST follows the last final).
The raw limit, same broker, same run: the median time of one bare paho request/answer round trip
with Nagle off (stack.raw_round_trips), and of one bare GET /livez.

It also prints the CPU time each part used per timed group job (from /proc): the service, Mosquitto,
the agents themselves, their commands' processes (held shells, `/bin/sh -c`, `date`) and this
client. With ten agents on two cores the figure is mostly this CPU divided by the cores.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from fleet import median_seconds, result  # first: puts the repo on sys.path
from stack import (
    BROKERS,
    agents,
    cpu_seconds,
    for_each_broker,
    job_final,
    median_ms,
    raw_round_trips,
    service_on,
    wait_subscribed,
)

GROUP = "latency"
RAW_DEVICE = "latency-raw"
RAW_COUNT = 500


WAIT_SECONDS = 30


def run(kind: str, workdir: Path, devices: int, runs: int, poll: bool, gap: float) -> None:
    with service_on(kind, workdir) as (service, broker_pid):
        api = service.api
        passwords = {f"latency-{i}": api.device(f"latency-{i}", GROUP) for i in range(devices)}
        raw_password = api.device(RAW_DEVICE)
        workflow_id = api.workflow("date", name="latency")
        with agents(workdir, service, passwords) as started:
            wait_subscribed(started)
            _one_job(api, workflow_id, poll, gap)  # warms up (and starts each agent's standby shell)
            parts = _CpuParts(service.proc.pid, broker_pid, [agent.proc.pid for agent in started])
            took = [_one_job(api, workflow_id, poll, gap) for _ in range(runs)]
            cpu = parts.per_job(runs)
        raw = raw_round_trips(service, RAW_DEVICE, raw_password, RAW_COUNT)
        livez = median_seconds(lambda: api.request("GET", "/livez"), 21)
    how = "polling GET" if poll else "GET ?WaitSeconds"
    print(f"[{kind}] group job over {devices} devices, POST until final ({how}): {median_ms(took):.1f} ms "
          f"(median of {runs}: {', '.join(f'{t * 1000:.0f}' for t in took)} ms)")
    print(f"[{kind}] raw: one MQTT round trip {1000 / raw:.2f} ms (bare paho, Nagle off); "
          f"GET /livez {livez * 1000:.2f} ms")
    print(f"[{kind}] ratio job / MQTT round trip: {median_ms(took) * raw / 1000:.0f}")
    print(f"[{kind}] CPU per group job: " + ", ".join(f"{part} {ms:.1f} ms" for part, ms in cpu.items())
          + f"; all {sum(cpu.values()):.1f} ms on {os.cpu_count()} cores")
    result(f"group-latency-{kind}", median_ms(took), "ms", 1000 / raw, median_ms(took) * raw / 1000, "figure < 50",
           devices=devices, runs=runs, cpu_ms={part: round(ms, 2) for part, ms in cpu.items()},
           **({"client": "poll"} if poll else {}), **({"gap_s": gap} if gap else {}))


class _CpuParts:
    """CPU seconds used since it was made by each part of the run, from /proc."""

    def __init__(self, service_pid: int, broker_pid: int | None, agent_pids: list[int]) -> None:
        self.pids = service_pid, broker_pid, agent_pids
        self.start = self._now()

    def _now(self) -> dict[str, float]:
        service_pid, broker_pid, agent_pids = self.pids
        agents = [_own_and_children(pid) for pid in agent_pids]
        mine = os.times()
        return {"service": cpu_seconds(service_pid), **({"mosquitto": cpu_seconds(broker_pid)} if broker_pid else {}),
                "agents": sum(own for own, _ in agents), "their commands": sum(children for _, children in agents),
                "client": mine.user + mine.system}

    def per_job(self, jobs: int) -> dict[str, float]:
        """Milliseconds of CPU per job, by part."""
        now = self._now()
        return {part: (now[part] - self.start[part]) * 1000 / jobs for part in now}


def _own_and_children(pid: int) -> tuple[float, float]:
    """(the process's own, its waited-for children's) user + system CPU seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def _one_job(api, workflow_id: str, poll: bool, gap: float) -> float:
    time.sleep(gap)
    start = time.perf_counter()
    job_id = api.submit(workflow_id, "latency", DeviceGroup=GROUP)
    while not job_final(api, job_id, 0 if poll else WAIT_SECONDS):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10, help="devices (agents) in the group (default 10)")
    parser.add_argument("--runs", type=int, default=7, help="timed group jobs, one after another (default 7)")
    parser.add_argument("--broker", choices=[*BROKERS, "both"], default="both", help="which broker (default both)")
    parser.add_argument("--poll", action="store_true",
                        help="poll GET /v1/job/{id} as fast as it answers instead of one GET ?WaitSeconds")
    parser.add_argument("--gap", type=float, default=0.0, help="seconds between one run's final and the next POST")
    args = parser.parse_args()
    for_each_broker(args.broker, lambda kind, workdir: run(kind, workdir, args.devices, args.runs, args.poll,
                                                           args.gap))


if __name__ == "__main__":
    main()
