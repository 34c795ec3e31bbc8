"""What the client prints: rich tables for people, the API's own JSON for scripts (--json)."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Iterable

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from agent.protocol import JobStatus

LOG_WIDTH = 160  # when stdout is a file or a pipe (CI logs), rich would otherwise squeeze tables into 80 columns
STATUS_STYLES = {
    JobStatus.QUEUED.value: "dim", JobStatus.IN_PROGRESS.value: "cyan", JobStatus.SUCCEEDED.value: "green",
    JobStatus.FAILED.value: "bold red", JobStatus.TIMED_OUT.value: "red", JobStatus.CANCELED.value: "yellow",
    JobStatus.INTERRUPTED.value: "yellow", JobStatus.REJECTED.value: "magenta",
}
TARGETS = {"DeviceId": "device", "DeviceGroup": "group", "TagId": "tag"}


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else LOG_WIDTH
    return Console(file=stream, highlight=False, width=width, soft_wrap=False)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def status(value: str | None) -> Text:
    return Text(value or "-", style=STATUS_STYLES.get(value or "", ""))


def cell(value: object) -> Text:
    """User data as plain text: a name like '[red]' is shown, never read as rich markup."""
    if isinstance(value, Text):
        return value
    if value is None or value == "":
        return Text("-", style="dim")
    if isinstance(value, bool):
        return Text("yes" if value else "no")
    if isinstance(value, list):
        return Text(", ".join(map(str, value)) or "-")
    return Text(str(value))


def first_line(text: str | None, width: int = 60) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def table(columns: Iterable[str], rows: Iterable[Iterable[Text]], ids: int = 1) -> Table:
    """A table whose first `ids` columns are never cut short (ids are for copying)."""
    grid = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for i, name in enumerate(columns):
        grid.add_column(name, no_wrap=i < ids, min_width=36 if i < ids else None, overflow="fold")
    for row in rows:
        grid.add_row(*row)
    return grid


def workflows(items: list[dict[str, Any]]) -> Table:
    return table(("WorkflowId", "Name", "Command", "Timeout", "Created"), (
        (cell(w["WorkflowId"]), cell(w["Name"]), cell(first_line(w["Command"])), cell(w.get("TimeoutSeconds")),
         cell(w.get("CreatedTime"))) for w in items))


def target(job: dict[str, Any]) -> Text:
    field = next((f for f in TARGETS if f in job), None)
    return Text(f"{TARGETS[field]} {job[field]}") if field else cell(None)


def progress(job: dict[str, Any]) -> Text:
    """A group job's counts ('2/3 succeeded, 1 failed'); a device job's exit code."""
    result = job.get("Result")
    if not isinstance(result, dict):
        return cell(None if job.get("ExitCode") is None else f"exit {job['ExitCode']}")
    done = [f"{n} {s.lower().replace('_', ' ')}" for s, n in result.items() if s != "Total" and n]
    return Text(f"{result.get('Total', 0)} devices: " + (", ".join(done) or "none yet"))


def jobs(items: list[dict[str, Any]]) -> Table:
    return table(("JobId", "Name", "Target", "Status", "Progress", "Created"), (
        (cell(j["JobId"]), cell(j.get("JobName")), target(j), status(j.get("Status")), progress(j),
         cell(j.get("CreatedTime"))) for j in items))


def outcome(child: dict[str, Any]) -> str:
    """What a person wants to see of a child's result: the reason, else the first line of its output
    (of stderr first when it did not succeed)."""
    streams = ("Stdout", "Stderr") if child.get("Status") == JobStatus.SUCCEEDED.value else ("Stderr", "Stdout")
    return first_line(child.get("Reason")) or first_line(child.get(streams[0])) or first_line(child.get(streams[1]))


def children(items: list[dict[str, Any]]) -> Table:
    return table(("DeviceId", "Status", "Exit", "Output", "Ended", "JobId"), (
        (cell(c["DeviceId"]), status(c.get("Status")), cell(c.get("ExitCode")), cell(outcome(c)),
         cell(c.get("EndTime")), cell(c["JobId"])) for c in items), ids=0)


def devices(items: list[dict[str, Any]]) -> Table:
    return table(("DeviceId", "Group", "Tags", "Online", "Enabled", "Queued", "Last seen"), (
        (cell(d["DeviceId"]), cell(d.get("DeviceGroup")), cell(d.get("Tags")),
         Text("online", style="green") if d.get("Online") else Text("offline", style="dim"),
         cell(d.get("Enabled")), cell(d.get("PendingJobs")), cell(d.get("LastSeen"))) for d in items), ids=0)


def record(data: dict[str, Any], hide: Iterable[str] = ()) -> Table:
    """One object as 'Field  value' lines; multi-line values (output, commands) kept whole."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in data.items():
        if key in hide:
            continue
        if key == "Result" and isinstance(value, dict):
            value = progress(data)
        grid.add_row(key, status(value) if key == "Status" else cell(value))
    return grid


def show(as_json: bool, data: Any, view: Callable[[Any], Any]) -> None:
    if as_json:
        print_json(data)
    else:
        console().print(view(data))
