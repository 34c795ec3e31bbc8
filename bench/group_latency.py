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
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fleet import median_seconds, result  # first: puts the repo on sys.path
from stack import BROKERS, agents, for_each_broker, job_final, median_ms, raw_round_trips, service_on, wait_subscribed

GROUP = "latency"
RAW_DEVICE = "latency-raw"
RAW_COUNT = 500


WAIT_SECONDS = 30


def run(kind: str, workdir: Path, devices: int, runs: int, poll: bool, gap: float) -> None:
    with service_on(kind, workdir) as (service, _broker_pid):
        api = service.api
        passwords = {f"latency-{i}": api.device(f"latency-{i}", GROUP) for i in range(devices)}
        raw_password = api.device(RAW_DEVICE)
        workflow_id = api.workflow("date", name="latency")
        with agents(workdir, service, passwords) as started:
            wait_subscribed(started)
            took = [_one_job(api, workflow_id, poll, gap) for _ in range(runs + 1)][1:]  # the first warms up
        raw = raw_round_trips(service, RAW_DEVICE, raw_password, RAW_COUNT)
        livez = median_seconds(lambda: api.request("GET", "/livez"), 21)
    how = "polling GET" if poll else "GET ?WaitSeconds"
    print(f"[{kind}] group job over {devices} devices, POST until final ({how}): {median_ms(took):.1f} ms "
          f"(median of {runs}: {', '.join(f'{t * 1000:.0f}' for t in took)} ms)")
    print(f"[{kind}] raw: one MQTT round trip {1000 / raw:.2f} ms (bare paho, Nagle off); "
          f"GET /livez {livez * 1000:.2f} ms")
    print(f"[{kind}] ratio job / MQTT round trip: {median_ms(took) * raw / 1000:.0f}")
    result(f"group-latency-{kind}", median_ms(took), "ms", 1000 / raw, median_ms(took) * raw / 1000, "figure < 50",
           devices=devices, runs=runs, **({"client": "poll"} if poll else {}), **({"gap_s": gap} if gap else {}))


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
