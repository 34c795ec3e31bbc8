"""What the client prints: rich tables for people, the API's own JSON for scripts (--json)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from agent.protocol import JobStatus

LOG_WIDTH = 160  # when stdout is a file or a pipe (CI logs), rich would otherwise squeeze tables into 80 columns
STATUS_STYLES = {
    JobStatus.SCHEDULED.value: "dim italic", JobStatus.QUEUED.value: "dim", JobStatus.DOWNLOADING.value: "blue",
    JobStatus.IN_PROGRESS.value: "cyan", JobStatus.SUCCEEDED.value: "green",
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


@dataclass(frozen=True)
class Column:
    """How a column gives way on a narrow terminal: ids and times are never cut or wrapped (they are
    for copying and reading whole), other text wraps; columns with a `drop` rank are left out, highest
    first, while the table would not fit."""

    name: str
    kind: str = "text"  # "id", "time", "word" (a status: not wrapped either), "text", or "free" (long text)
    drop: int = 0

    def natural_width(self, cells: list[Text]) -> int:
        widest = max([len(self.name), *(c.cell_len for c in cells)])
        return min(widest, FREE_FIT_WIDTH) if self.kind == "free" else widest


FREE_FIT_WIDTH = 24  # what a wrapping column needs at least, when deciding which columns to leave out
COLUMN_GAP = 3


def table(columns: tuple[Column, ...], rows: Iterable[tuple[Text, ...]]) -> Table:
    kept, body = _fit(list(columns), [list(r) for r in rows], console().width)
    grid = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in kept:
        fixed = column.kind in ("id", "time", "word")
        grid.add_column(column.name, no_wrap=fixed, min_width=column.natural_width([]) if fixed else None,
                        overflow="fold")
    for row in body:
        grid.add_row(*row)
    return grid


def _fit(columns: list[Column], rows: list[list[Text]], width: int) -> tuple[list[Column], list[list[Text]]]:
    """Leave out droppable columns, highest rank first, until the natural widths fit in width."""
    keep = list(range(len(columns)))
    widths = [c.natural_width([r[i] for r in rows]) for i, c in enumerate(columns)]
    for i in sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: -columns[i].drop):
        if sum(widths[k] + COLUMN_GAP for k in keep) <= width:
            break
        keep.remove(i)
    return [columns[k] for k in keep], [[r[k] for k in keep] for r in rows]


def when(value: str | None) -> Text:
    """2026-11-30T04:24:50.640Z as 2026-11-30 04:24:50 (the column says UTC; --json keeps it whole)."""
    return cell(value[:19].replace("T", " ") if value else None)


def workflows(items: list[dict[str, Any]]) -> Table:
    return table((Column("WorkflowId", "id"), Column("Name"), Column("Command", "free"), Column("Timeout", drop=2),
                  Column("Created (UTC)", "time", drop=1)), (
        (cell(w["WorkflowId"]), cell(w["Name"]), cell(first_line(w["Command"])), cell(w.get("TimeoutSeconds")),
         when(w.get("CreatedTime"))) for w in items))


def target(job: dict[str, Any]) -> Text:
    field = next((f for f in TARGETS if f in job), None)
    return Text(f"{TARGETS[field]} {job[field]}") if field else cell(None)


def progress(job: dict[str, Any]) -> Text:
    """A group job's counts ('2 succeeded, 1 failed of 3'); a device job's exit code."""
    result = job.get("Result")
    if not isinstance(result, dict):
        return cell(None if job.get("ExitCode") is None else f"exit {job['ExitCode']}")
    done = [f"{n} {s.lower().replace('_', ' ')}" for s, n in result.items() if s != "Total" and n]
    return Text(f"{', '.join(done) or 'none yet'} of {result.get('Total', 0)}")


def rollout(job: dict[str, Any]) -> str:
    """A job's rollout in one line ('wave 2 of 4, 10 released, 30 held'); empty without one."""
    state = job.get("Rollout")
    if not isinstance(state, dict):
        return ""
    parts = [f"wave {state['Wave']} of {state['Waves']}"] if state.get("Waves") else []
    if state.get("Kind") == "MaxPerMinute":
        parts.append(f"{state['RatePerMinute']:g} a minute")
    parts += [f"{state['Released']} released", f"{state['Pending']} held"]
    parts += ["paused"] if state.get("Paused") else []
    parts += ["continuous"] if state.get("Continuous") and state.get("Active") else []
    if state.get("Aborted"):
        parts.append(f"ABORTED: {state.get('AbortReason')}")
    return "rollout: " + ", ".join(parts)


def jobs(items: list[dict[str, Any]]) -> Table:
    return table((Column("JobId", "id"), Column("Name"), Column("Target"), Column("Status", "word"),
                  Column("Progress", "free"), Column("Created (UTC)", "time", drop=1)), (
        (cell(j["JobId"]), cell(j.get("JobName")), target(j), status(j.get("Status")), progress(j),
         when(j.get("CreatedTime"))) for j in items))


def size(count: int) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 20.0 MiB, 2.0 GiB."""
    value, unit = float(count), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"


def download(progress: dict[str, Any] | None) -> str:
    """A DOWNLOADING child's progress: '12.0 MiB of 50.0 MiB (24%)'."""
    if not progress:
        return ""
    done, total = progress.get("Bytes", 0), progress.get("TotalBytes", 0)
    share = f" ({100 * done // total}%)" if total else ""
    return f"{size(done)} of {size(total)}{share}"


def outcome(child: dict[str, Any]) -> str:
    """What a person wants to see of a child's result: the reason, else the first line of its output
    (of stderr first when it did not succeed); a download's progress while it fetches its artifacts."""
    if child.get("Status") == JobStatus.DOWNLOADING.value and child.get("Download"):
        return "downloading " + download(child["Download"])
    streams = ("Stdout", "Stderr") if child.get("Status") == JobStatus.SUCCEEDED.value else ("Stderr", "Stdout")
    return first_line(child.get("Reason")) or first_line(child.get(streams[0])) or first_line(child.get(streams[1]))


def attempt_line(a: dict[str, Any]) -> str:
    """One attempt of a child job: its number, state, exit code, end and what it said."""
    exit_code = f" exit {a['ExitCode']}" if a.get("ExitCode") is not None else ""
    ended = f" ended {a['EndTime']}" if a.get("EndTime") else ""
    said = outcome(a)
    return f"#{a.get('Attempt')} {a.get('Status')}{exit_code}{ended}" + (f": {said}" if said else "")


def children(items: list[dict[str, Any]]) -> Table:
    return table((Column("DeviceId", "id"), Column("Status", "word"), Column("Exit", "word"), Column("Output", "free"),
                  Column("Ended (UTC)", "time", drop=1), Column("JobId", "id", drop=2)), (
        (cell(c["DeviceId"]), status(c.get("Status")), cell(c.get("ExitCode")), cell(outcome(c)),
         when(c.get("EndTime")), cell(c["JobId"])) for c in items))


def artifacts(items: list[dict[str, Any]]) -> Table:
    return table((Column("ArtifactId", "id"), Column("Name"), Column("Version"), Column("Size", "word"),
                  Column("Sha256", "id", drop=2), Column("Created (UTC)", "time", drop=1)), (
        (cell(a["ArtifactId"]), cell(a["Name"]), cell(a["Version"]), cell(size(a["Size"])), cell(a["Sha256"]),
         when(a.get("Created"))) for a in items))


def devices(items: list[dict[str, Any]]) -> Table:
    return table((Column("DeviceId", "id"), Column("Group"), Column("Tags", "free"), Column("Online", "word"),
                  Column("Enabled", drop=2), Column("Queued"), Column("Last seen (UTC)", "time", drop=1)), (
        (cell(d["DeviceId"]), cell(d.get("DeviceGroup")), cell(d.get("Tags")),
         Text("online", style="green") if d.get("Online") else Text("offline", style="dim"),
         cell(d.get("Enabled")), cell(d.get("PendingJobs")), when(d.get("LastSeen"))) for d in items))


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
        elif key == "Attempts" and isinstance(value, list):
            value = "\n".join(attempt_line(a) for a in value)
        if key == "Download":
            value = download(value) or None
        grid.add_row(key, status(value) if key == "Status" else cell(value))
    return grid


def show(as_json: bool, data: Any, view: Callable[[Any], Any]) -> None:
    if as_json:
        print_json(data)
    else:
        console().print(view(data))
