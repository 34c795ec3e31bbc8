"""`job watch` and `job submit --watch`: follow a job until every device has answered.

On a terminal, a live progress bar with the counts per state, and a line per device as its result
arrives; in a pipe or a CI log, plain lines, one per change. The exit code says whether every device
succeeded, so a pipeline can gate on it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from agent.protocol import FINAL_STATUSES, JobStatus

from . import ServiceRefused, Unreachable, render
from .http import ServiceClient, path

FINALS = {s.value for s in FINAL_STATUSES}
ORDER = [s.value for s in JobStatus]
GIVE_UP_SECONDS = 60  # of the service not answering, before watch stops (the job itself goes on)
INTERRUPTED = 130


@dataclass
class Snapshot:
    job: dict[str, Any]
    children: list[dict[str, Any]]  # as of the last time a device finished: fetched only then

    @property
    def counts(self) -> Counter[str]:
        """Devices per state: a group job's Result has them, up to date; else from the children."""
        result = self.job.get("Result")
        if isinstance(result, dict):
            return Counter({s: n for s, n in result.items() if s in ORDER})
        return Counter(c["Status"] for c in self.children)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return sum(n for s, n in self.counts.items() if s in FINALS)

    @property
    def done(self) -> bool:
        return self.job.get("Status") in FINALS and self.finished == self.total

    @property
    def succeeded(self) -> bool:
        return self.total > 0 and self.counts[JobStatus.SUCCEEDED.value] == self.total

    def summary(self) -> str:
        counts = ", ".join(f"{self.counts[s]} {s.lower().replace('_', ' ')}" for s in ORDER if self.counts[s])
        return (counts or "no devices") + self.downloading()

    def downloading(self) -> str:
        """'; downloading 12.0 MiB of 50.0 MiB (24%)' over the children fetching artifacts, as last fetched."""
        fetching = [c["Download"] for c in self.children
                    if c.get("Status") == JobStatus.DOWNLOADING.value and c.get("Download")]
        if not fetching:
            return ""
        return "; downloading " + render.download({"Bytes": sum(d["Bytes"] for d in fetching),
                                                   "TotalBytes": sum(d["TotalBytes"] for d in fetching)})


@dataclass
class Watcher:
    client: ServiceClient
    job_id: str
    interval: float
    note: Callable[[str], None]  # says on stderr that the service is away, and back
    reported: set[str] = field(default_factory=set)  # child job ids whose final result was shown
    last: Snapshot | None = None

    def poll(self) -> Snapshot:
        """The job and its children, riding out a service that is briefly away."""
        failing_since = None
        while True:
            try:
                snap = self.snapshot()
            except (Unreachable, ServiceRefused) as e:
                if isinstance(e, ServiceRefused) and e.status != 503:
                    raise
                if failing_since is None:
                    failing_since = time.monotonic()
                    self.note(f"{e.detail}; asking again for up to {GIVE_UP_SECONDS} s (the job goes on)")
                if time.monotonic() - failing_since > GIVE_UP_SECONDS:
                    raise
                time.sleep(max(self.interval, 1.0))
                continue
            if failing_since is not None:
                self.note("the service answers again")
            return snap

    def snapshot(self) -> Snapshot:
        """The job; its children (every device's output) only when another device has finished, so that
        watching a large group costs one small request per interval."""
        job = self.client.get(path("job", self.job_id))
        if "ParentJobId" in job:  # a child job's id: watch that one device
            return Snapshot(job, [job])
        snap = Snapshot(job, self.last.children if self.last else [])
        if self.last is None or snap.finished != self.last.finished or not isinstance(job.get("Result"), dict):
            snap = Snapshot(job, self.client.get(path("job", self.job_id, "childjobs")))
        self.last = snap
        return snap

    def new_results(self, snap: Snapshot) -> list[dict[str, Any]]:
        fresh = [c for c in snap.children if c["Status"] in FINALS and c["JobId"] not in self.reported]
        self.reported.update(c["JobId"] for c in fresh)
        return fresh

    def follow(self, show: Callable[[Snapshot, list[dict[str, Any]]], None]) -> Snapshot:
        while True:
            snap = self.poll()
            show(snap, self.new_results(snap))
            if snap.done:
                return snap
            time.sleep(self.interval)


def result_line(child: dict[str, Any]) -> Text:
    exit_code = child.get("ExitCode")
    line = Text(f"{child['DeviceId']}  ")
    line.append(child["Status"], style=render.STATUS_STYLES.get(child["Status"], ""))
    line.append(f"  exit {exit_code}" if exit_code is not None else "")
    output = render.outcome(child)
    return line.append(f"  {output}" if output else "")


def counts_markup(snap: Snapshot) -> str:
    parts = [f"[{render.STATUS_STYLES.get(s, '')}]{snap.counts[s]} {s.lower().replace('_', ' ')}[/]"
             for s in ORDER if snap.counts[s]]
    return ", ".join(parts)


def watch_live(watcher: Watcher, console: Console) -> Snapshot:
    columns = (TextColumn("job {task.fields[job]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), TextColumn("{task.fields[rollout]}"))
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("", total=None, job=watcher.job_id[:8], counts="", rollout="")

        def show(snap: Snapshot, fresh: list[dict[str, Any]]) -> None:
            for child in fresh:
                bar.console.print(result_line(child))
            bar.update(task, total=snap.total, completed=snap.finished,
                       counts=counts_markup(snap) + escape(snap.downloading()), rollout=render.rollout(snap.job))

        return watcher.follow(show)


def watch_plain(watcher: Watcher, console: Console) -> Snapshot:
    last = [""]

    def show(snap: Snapshot, fresh: list[dict[str, Any]]) -> None:
        for child in fresh:
            console.print(result_line(child))
        line = f"job {watcher.job_id}: {snap.finished}/{snap.total} done ({snap.summary()})"
        rollout = render.rollout(snap.job)
        line += f"; {rollout}" if rollout else ""
        if line != last[0]:
            console.print(line)
            last[0] = line

    return watcher.follow(show)


def watch(client: ServiceClient, job_id: str, interval: float, as_json: bool) -> int:
    """Follow the job to its end; 0 only if every device succeeded, 130 when interrupted."""
    out, err = render.console(), render.console(stderr=True)
    watcher = Watcher(client, job_id, interval, lambda text: err.print(text, markup=False, soft_wrap=True))
    try:
        if as_json:
            snap = watcher.follow(lambda _snap, _fresh: None)
        elif out.is_terminal:
            snap = watch_live(watcher, out)
        else:
            snap = watch_plain(watcher, out)
    except KeyboardInterrupt:
        err.print(f"stopped watching; job {job_id} keeps running on the devices "
                  f"(`ota-bridge job cancel {job_id}` stops it)", highlight=False)
        return INTERRUPTED
    if as_json:
        render.print_json({"Job": snap.job, "Children": snap.children})
    elif snap.job.get("Rollout", {}).get("Aborted"):
        out.print(Text(render.rollout(snap.job), style="red"))
    else:
        verdict = Text("all succeeded", style="green") if snap.succeeded else Text("not all succeeded", style="red")
        out.print(Text(f"job {job_id} {snap.job.get('Status')}: {snap.summary()} of {snap.total} "
                       f"device{'s' if snap.total != 1 else ''}; ").append(verdict))
    return 0 if snap.succeeded else 1
