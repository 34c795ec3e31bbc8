"""Fault injection for tests/test_chaos.py: a seeded plan, and a fleet of real processes that lives it.

The plan is made up front from one `random.Random(seed)`: what each round of jobs runs, when it
is submitted, when the service is SIGKILLed and started again, when the broker crashes (SIGKILL)
or stops and for how long, which agents crash and for how long. Some faults are aimed: they
wait (briefly) for a command to run or to end, so that they strike while a result is on its
way; the agent they hit is picked from the ones caught, with the same generator. The same seed
gives the same plan; the processes' own timing still varies from run to run.
"""

from __future__ import annotations

import enum
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from agent.journal import read_entries
from agent.protocol import FINAL_STATUSES
from tests.support.mosquitto import Mosquitto
from tests.support.processes import Agent, Api, Process, Service, wait_until

if TYPE_CHECKING:
    from tests.conftest import Launcher

DEVICES = [f"chaos-{n:02d}" for n in range(50)]
GROUPS = ("fleet-a", "fleet-b")  # the first half of DEVICES, the second half
TAG = "chaos"  # every device
ROUNDS = 6  # at most journal.FULL_OUTPUT_ENTRIES, so that every journal entry keeps its output
PHASE_SECONDS = 45.0  # faults are injected for this long
SERVICE_RESTARTS = 4
BROKER_OUTAGES = 4  # a SIGKILL or a clean stop, down for 0.2 to 3 s
AGENT_CRASHES = 20  # a planned device, down for up to 4 s
BUSY_AGENT_CRASHES = 20  # an agent caught running or ending a command, started again at once
AIMED = "as a command ends"  # the target of a service or broker fault that waits for its moment
CATCH_SECONDS = 1.5  # how long an aimed fault waits for its moment before it strikes anyway
FAILING_EXIT = 3
FINAL = {status.value for status in FINAL_STATUSES}


# --- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    """One job over the whole fleet; what it runs is decided by the seed."""

    number: int
    sleep: float  # seconds between the command's start line and its done line
    failing: bool  # devices whose id ends in an odd digit exit FAILING_EXIT
    by_group: bool  # submitted as one job per group rather than one job for the tag

    def command(self, run_dir: Path) -> str:
        """Log the start, sleep, log the end, print, exit: the run log shows every start."""
        runs = f'"{run_dir}/$OTA_DEVICE_ID.runs"'
        finish = f'case "$OTA_DEVICE_ID" in *[13579]) exit {FAILING_EXIT};; esac' if self.failing else "exit 0"
        return (f'echo "$OTA_JOB_ID" >> {runs}; sleep {self.sleep}; echo "done $OTA_JOB_ID" >> {runs}; '
                f'echo "$OTA_JOB_ID on $OTA_DEVICE_ID"; echo "round {self.number}" >&2; {finish}')

    def exit_code(self, device_id: str) -> int:
        return FAILING_EXIT if self.failing and device_id[-1] in "13579" else 0

    def stdout(self, job_id: str, device_id: str) -> str:
        return f"{job_id} on {device_id}\n"

    def stderr(self) -> str:
        return f"round {self.number}\n"


def make_rounds(rng: random.Random) -> list[Round]:
    """Short commands, and one slow round whose commands outlive a broker or service restart."""
    slow = rng.randrange(ROUNDS)
    return [Round(n, round(rng.uniform(1.5, 3.0) if n == slow else rng.uniform(0.05, 0.3), 2),
                  rng.random() < 0.4, rng.random() < 0.5) for n in range(ROUNDS)]


def broker_lines(rng: random.Random, workdir: Path) -> list[str]:
    """Mosquitto as in the sample config (no persistence), or, for half the seeds, with
    persistence saved every 2 s: a SIGKILL then brings back slightly stale retained heads and
    sessions, which the agents' settle delay and Seq checks must see through."""
    if rng.random() < 0.5:
        return []
    return ["persistence true", f"persistence_location {workdir}/", "autosave_interval 2"]


class Action(str, enum.Enum):
    SUBMIT = "submit round"
    RESTART_SERVICE = "SIGKILL the service and start it again"
    CRASH_BROKER = "SIGKILL the broker"
    STOP_BROKER = "stop the broker"
    START_BROKER = "start the broker"
    CRASH_AGENT = "SIGKILL agent"
    CRASH_RUNNING_AGENT = "SIGKILL an agent while its command runs, and start it again:"
    CRASH_ENDING_AGENT = "SIGKILL an agent as its command ends, and start it again:"
    START_AGENT = "start agent"


@dataclass(frozen=True)
class Step:
    at: float  # seconds into the fault phase
    action: Action
    target: str = ""  # the round number, the device id, or AIMED


def make_plan(rng: random.Random) -> list[Step]:
    """Two rounds at once to start (queues two deep), the others spread over the phase. Faults
    fall mostly in the two seconds after a submission, when commands run, some anywhere; half
    the service and broker faults, and the busy-agent crashes, wait for a command to end (or,
    for some agent crashes, to run), so that they strike while its result is on its way."""
    submitted = [0.0, 0.0] + sorted(rng.uniform(3, PHASE_SECONDS - 8) for _ in range(ROUNDS - 2))
    steps = [Step(at, Action.SUBMIT, str(n)) for n, at in enumerate(submitted)]

    def moment() -> float:
        if rng.random() < 0.6:
            return min(rng.choice(submitted) + rng.uniform(0.1, 2.0), PHASE_SECONDS - 2)
        return rng.uniform(0.5, PHASE_SECONDS - 2)

    for _ in range(SERVICE_RESTARTS):
        steps.append(Step(moment(), Action.RESTART_SERVICE, rng.choice(["", AIMED])))
    for _ in range(BROKER_OUTAGES):
        at = moment()
        steps.append(Step(at, rng.choice([Action.CRASH_BROKER, Action.STOP_BROKER]), rng.choice(["", AIMED])))
        steps.append(Step(at + rng.uniform(0.2, 3.0), Action.START_BROKER))
    for _ in range(AGENT_CRASHES):
        at, device = moment(), rng.choice(DEVICES)
        steps.append(Step(at, Action.CRASH_AGENT, device))
        steps.append(Step(at + rng.uniform(0.0, 4.0), Action.START_AGENT, device))
    for _ in range(BUSY_AGENT_CRASHES):
        at = rng.choice(submitted) + rng.uniform(0.1, 1.5)
        steps.append(Step(at, rng.choice([Action.CRASH_RUNNING_AGENT, Action.CRASH_ENDING_AGENT])))
    return sorted(steps, key=lambda step: step.at)  # stable: a start never precedes its crash


# --- the fleet ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    parent_id: str
    round: Round


@dataclass
class Fleet:
    """The broker, the service, one agent per device, and what was done to them."""

    broker: Mosquitto
    service: Service
    agents: dict[str, Agent]
    run_dir: Path
    rounds: list[Round]
    rng: random.Random  # picks the busy agent to crash, and the moment of an aimed fault
    workflows: dict[int, str] = field(default_factory=dict)  # round number -> workflow id
    submissions: list[Submission] = field(default_factory=list)  # in submission order
    crashed: set[str] = field(default_factory=set)  # devices whose agent was SIGKILLed

    @property
    def api(self) -> Api:
        return self.service.api

    def do(self, step: Step) -> str:
        """Carry out one step; returns what it struck, for the test's output."""
        action, target = step.action, step.target
        if action in (Action.CRASH_RUNNING_AGENT, Action.CRASH_ENDING_AGENT):
            return self.crash_busy_agent(ending=action is Action.CRASH_ENDING_AGENT)
        if target == AIMED and not self.catch_commands(ending=True):
            target += " (none ended)"
        if action is Action.SUBMIT:
            self.submit(self.rounds[int(target)])
        elif action is Action.RESTART_SERVICE:
            self.restart_service()
        elif action is Action.CRASH_BROKER:
            self.broker.kill()
        elif action is Action.STOP_BROKER:
            self.broker.stop()
        elif action is Action.START_BROKER and not self.broker_running:
            self.broker.start()
        elif action is Action.CRASH_AGENT and self.agents[target].running:
            self.agents[target].kill()
            self.crashed.add(target)
        elif action is Action.START_AGENT and not self.agents[target].running:
            self.agents[target].start()
        else:
            return f"{target} (nothing to do)".lstrip()
        return target

    @property
    def broker_running(self) -> bool:
        return self.broker.process is not None and self.broker.process.poll() is None

    def crash_busy_agent(self, ending: bool) -> str:
        """SIGKILL an agent caught running (or ending) a command, and start it again at once."""
        caught = self.catch_commands(ending)
        if not caught:
            return "(none caught)"
        device = self.rng.choice(caught)
        self.agents[device].kill()
        self.crashed.add(device)
        self.agents[device].start()
        return device

    def catch_commands(self, ending: bool) -> list[str]:
        """Wait up to CATCH_SECONDS for devices whose command runs or (ending=True) writes its
        done line; then, for an ending, a random moment more (up to 0.15 s), so that a fault
        lands before, while or after the agent journals and publishes the result."""
        seen = {device: len(self.run_log(device)) for device in self.agents}
        deadline = time.monotonic() + CATCH_SECONDS
        while not (caught := [d for d in self.agents if self._caught(d, seen[d], ending)]):
            if time.monotonic() > deadline:
                return []
            time.sleep(0.01)
        if ending:
            time.sleep(self.rng.uniform(0, 0.15))
        return caught

    def _caught(self, device: str, lines_before: int, ending: bool) -> bool:
        if not self.agents[device].running:
            return False
        runs = self.run_log(device)
        if ending:
            return len(runs) > lines_before and runs[-1].startswith("done ")
        return bool(runs) and not runs[-1].startswith("done ")

    def submit(self, job_round: Round) -> None:
        workflow = self.workflows[job_round.number]
        name = f"round-{job_round.number}"
        targets = [{"DeviceGroup": g} for g in GROUPS] if job_round.by_group else [{"TagId": TAG}]
        for target in targets:
            self.submissions.append(Submission(self.api.submit(workflow, name, **target), job_round))

    def restart_service(self) -> None:
        """SIGKILL, then the same ports and data dir. With the broker down, wait for HTTP only."""
        self.service.kill()
        if self.broker_running:
            self.service.start()
            return
        Process.start(self.service)  # Service.start would wait for the broker connection too
        health = Api(self.api.base, None)
        wait_until(lambda: _answers(health), 30, "the service's REST API to answer (broker down)")

    def heal(self) -> None:
        """Everything up again: the broker, the service's broker connection, every agent."""
        if not self.broker_running:
            self.broker.start()
        wait_until(lambda: self.api.request("GET", "/v1/health").body["BrokerConnected"], 30,
                   "the service to reconnect to the broker")
        for agent in self.agents.values():
            if not agent.running:
                agent.start()

    def stop_agents(self) -> None:
        """SIGTERM every agent at once, then wait for each (one by one would take 50 shutdowns)."""
        for agent in self.agents.values():
            if agent.proc is not None and agent.running:
                agent.proc.send_signal(signal.SIGTERM)
        for agent in self.agents.values():
            agent.stop()

    def commands_left_running(self) -> list[str]:
        """Commands that logged their start but not their end, and were not stopped as INTERRUPTED.

        A restarted agent stops the command its crashed predecessor left running, so such a
        command never logs its end: its job is INTERRUPTED.
        """
        interrupted = {child["JobId"] for jobs in self.children().values() for _, child in jobs
                       if child["Status"] == "INTERRUPTED"}
        left = []
        for device in self.agents:
            runs = self.run_log(device)
            left += [f"device {device} job {line}" for line in runs
                     if not line.startswith("done ") and f"done {line}" not in runs and line not in interrupted]
        return left

    def children(self) -> dict[str, list[tuple[Round, dict[str, Any]]]]:
        """Per device, its child jobs (from the database) with their round, in submission order."""
        by_device: dict[str, list[tuple[Round, dict[str, Any]]]] = {d: [] for d in self.agents}
        for submission in self.submissions:
            for child in self.api.ok("GET", f"/v1/job/{submission.parent_id}/childjobs"):
                by_device[child["DeviceId"]].append((submission.round, child))
        return by_device

    def pending_children(self) -> list[str]:
        """Per device with jobs not final: its first such job, and how many more wait behind it."""
        stuck = []
        for device, jobs in self.children().items():
            pending = [child for _, child in jobs if child["Status"] not in FINAL]
            if pending:
                first = pending[0]
                stuck.append(f"device {device} at job {first['JobId']} {first['Status']}, {len(pending) - 1} behind")
        return stuck

    def run_log(self, device_id: str) -> list[str]:
        path = self.run_dir / f"{device_id}.runs"
        return path.read_text().splitlines() if path.exists() else []

    def journal(self, device_id: str) -> list[dict[str, Any]]:
        return read_entries(self.agents[device_id].state_dir / device_id)


def _answers(api: Api) -> bool:
    try:
        return api.request("GET", "/livez").status == 200  # /v1/health is 503 while the broker is down
    except OSError:
        return False


def start_fleet(launch: Launcher, broker: Mosquitto, workdir: Path, rounds: list[Round],
                rng: random.Random) -> Fleet:
    """The service on the broker, DEVICES registered in GROUPS and TAG, one workflow per round,
    and every agent started and online."""
    service = launch.service(mqtt_url=broker.url)
    api = service.api
    run_dir = workdir / "runs"
    run_dir.mkdir()
    agents = {}
    for n, device_id in enumerate(DEVICES):
        password = api.device(device_id, group=GROUPS[n * len(GROUPS) // len(DEVICES)], tags=[TAG])
        agents[device_id] = launch.agent(service, device_id, password, "--kill-grace", "1", start=False)
    for agent in agents.values():
        agent.start()
    fleet = Fleet(broker, service, agents, run_dir, rounds, rng)
    for r in rounds:
        fleet.workflows[r.number] = api.workflow(r.command(run_dir), f"chaos-round-{r.number}", TimeoutSeconds=600)
    wait_until(lambda: all(d["Online"] for d in api.ok("GET", f"/v1/device?TagId={TAG}")), 60,
               f"all {len(DEVICES)} agents to come online", interval=0.5)
    return fleet


def run_plan(fleet: Fleet, plan: list[Step], say: Callable[[str], None] = print) -> None:
    """Carry out each step at its time (or as soon as the previous one is done, if that is later)."""
    begin = time.monotonic()
    for step in plan:
        time.sleep(max(0.0, begin + step.at - time.monotonic()))
        done = fleet.do(step)
        say(f"[{time.monotonic() - begin:5.1f} s] {step.action.value} {done}".rstrip())
