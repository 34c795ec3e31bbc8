"""One device draining its queue: jobs/s, against bare MQTT round trips/s on the same broker.

    .venv/bin/python bench/drain.py [--jobs 200] [--broker embedded|mosquitto|both] [--timeout 90]

For each broker: the service (its embedded broker, or a Mosquitto it reaches with --mqtt-url),
one registered device, N jobs of `true` queued while the device is offline, then one real
`ota-agent` started for it. The figure: N over the time from the first job's StartTime to the
last job's EndTime (both as the agent reported them, millisecond precision). Printed beside it:
the wall time from the agent's start until the API says the last job is final (start-up
included; polled every 0.25 s, so the polling adds little to the service's CPU), and the CPU
each process used per job (/proc/PID/stat). The raw limit, same broker, same run, after the
drain: bare paho request/answer round trips per second with Nagle off (stack.raw_round_trips).
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path

from fleet import result, timed  # first: puts the repo on sys.path
from stack import BROKERS, agents, cpu_seconds, for_each_broker, job_final, raw_round_trips, service_on

from tests.support.processes import wait_until

DEVICE = "drain-0"
RAW_DEVICE = "drain-raw"
RAW_COUNT = 2000


def run(kind: str, workdir: Path, jobs: int, timeout: float) -> None:
    with service_on(kind, workdir) as (service, broker_pid):
        api = service.api
        password = api.device(DEVICE)
        raw_password = api.device(RAW_DEVICE)
        workflow_id = api.workflow("true", name="drain")
        queued, job_ids = timed(lambda: [api.submit(workflow_id, f"drain-{i}", DeviceId=DEVICE) for i in range(jobs)])
        pids = (service.proc.pid, broker_pid)
        cpu_before = [cpu_seconds(pid) for pid in pids]
        with agents(workdir, service, {DEVICE: password}) as (agent,):
            start = time.perf_counter()
            wait_until(lambda: job_final(api, job_ids[-1]), timeout, "the last job to be final", interval=0.25)
            wall = time.perf_counter() - start
            used = [cpu_seconds(pid) - c for pid, c in zip(pids, cpu_before, strict=True)]
            cpu = [cpu_seconds(agent.proc.pid), *used]
        first, last = api.ok("GET", f"/v1/job/{job_ids[0]}"), api.ok("GET", f"/v1/job/{job_ids[-1]}")
        statuses = {api.ok("GET", f"/v1/job/{job_id}")["Status"] for job_id in job_ids}
        raw = raw_round_trips(service, RAW_DEVICE, raw_password, RAW_COUNT)
    span = _seconds(last["EndTime"]) - _seconds(first["StartTime"])
    rate = jobs / span
    print(f"[{kind}] queued {jobs} `true` jobs offline in {queued:.2f} s; final statuses: {sorted(statuses)}")
    print(f"[{kind}] drain:  {rate:.1f} jobs/s ({jobs} jobs, first start to last end {span:.3f} s; "
          f"agent start to last final {wall:.2f} s)")
    broker_cpu = f", mosquitto {cpu[2] / jobs * 1000:.1f} ms" if broker_pid else ""
    print(f"[{kind}] CPU per job: agent {cpu[0] / jobs * 1000:.1f} ms (its start-up included), "
          f"service {cpu[1] / jobs * 1000:.1f} ms{broker_cpu}")
    print(f"[{kind}] raw:    {raw:.0f} round trips/s (bare paho QoS 1 publish -> delivery, Nagle off, {RAW_COUNT})")
    print(f"[{kind}] ratio drain / raw: {rate / raw:.3f}")
    result(f"drain-{kind}", rate, "jobs/s", raw, rate / raw, "figure >= 150", raw_unit="round trips/s", jobs=jobs,
           agent_cpu_ms=cpu[0] / jobs * 1000, service_cpu_ms=cpu[1] / jobs * 1000)


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs queued on the one device (default 200)")
    parser.add_argument("--broker", choices=[*BROKERS, "both"], default="both", help="which broker (default both)")
    parser.add_argument("--timeout", type=float, default=90, help="seconds to wait for the last job (default 90)")
    args = parser.parse_args()
    for_each_broker(args.broker, lambda kind, workdir: run(kind, workdir, args.jobs, args.timeout))


if __name__ == "__main__":
    main()
