"""bench/run's parsing and rendering on canned RESULT lines: no benchmark runs."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO

MACHINE = {"CPU": "Test CPU", "cores": "2", "Python": "3.11.7"}
OUTPUT = """\
registered 50 devices in 0.2 s
[mosquitto] drain:  61.7 jobs/s
RESULT {"name": "drain-mosquitto", "figure": 61.7, "unit": "jobs/s", "raw": 4477, "ratio": 0.0138, \
"goal": "figure >= 150", "raw_unit": "round trips/s", "jobs": 200}
RESULT {"name": "read-api-sqlite", "figure": 2791, "unit": "req/s", "raw": 5859, "ratio": 0.48, "goal": "ratio >= 0.4"}
RESULT {"name": "memory-embedded-per-device", "figure": 672, "unit": "B", "raw": null, "ratio": 1.02, "goal": null}
"""


@pytest.fixture(scope="module")
def bench_run():
    """bench/run loaded as a module (it has no .py suffix)."""
    loader = importlib.machinery.SourceFileLoader("bench_run", str(REPO / "bench" / "run"))
    spec = importlib.util.spec_from_loader("bench_run", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up here
    try:
        loader.exec_module(module)
        yield module
    finally:
        del sys.modules["bench_run"]


def test_parse_results_reads_only_result_lines(bench_run) -> None:
    records = bench_run.parse_results(OUTPUT.splitlines())
    assert [r["name"] for r in records] == ["drain-mosquitto", "read-api-sqlite", "memory-embedded-per-device"]
    assert records[0]["jobs"] == 200


def test_a_result_line_without_a_unit_is_refused(bench_run) -> None:
    with pytest.raises(ValueError, match="name, figure and unit"):
        bench_run.parse_results(['RESULT {"name": "x", "figure": 1}'])


def test_goals_are_judged_on_the_figure_or_the_ratio(bench_run) -> None:
    drain, read, memory = bench_run.parse_results(OUTPUT.splitlines())
    assert bench_run.goal_met(drain) is False
    assert bench_run.goal_met(read) is True
    assert bench_run.goal_met(memory) is None
    assert bench_run.goal_met({"name": "x", "figure": 40.0, "goal": "figure < 50"}) is True
    with pytest.raises(ValueError, match="figure\\|ratio OP NUMBER"):
        bench_run.goal_met({"name": "x", "figure": 1.0, "goal": "fast enough"})


def test_render_gives_a_row_per_figure_with_its_note(bench_run) -> None:
    run = bench_run.Run(results=bench_run.parse_results(OUTPUT.splitlines()), failures=["fanout (exit 1: boom)"])
    notes = {"drain-mosquitto": "py-spy: the | journal"}
    section = bench_run.render(run, MACHINE, notes, "2026-11-30 07:00 UTC")
    rows = [line for line in section.splitlines() if line.startswith("| drain") or line.startswith("| read")]
    assert rows[0] == ("| drain-mosquitto | 61.7 jobs/s | 4,477 round trips/s | 0.0138 | figure >= 150 | not met "
                       "| jobs 200 | py-spy: the \\| journal |")
    assert "| 2,791 req/s | 5,859 req/s | 0.48 | ratio >= 0.4 | **met** |" in rows[1]
    assert "Machine: CPU Test CPU; cores 2; Python 3.11.7." in section
    assert "Did not finish: fanout (exit 1: boom)." in section
    assert section.startswith(bench_run.BEGIN) and section.endswith(bench_run.END)


def test_rewrite_keeps_what_lies_outside_the_markers(bench_run) -> None:
    text = f"# Results\n\n{bench_run.BEGIN}\nold\n{bench_run.END}\n\n# Earlier runs\nhistory\n"
    new = bench_run.rewrite(text, f"{bench_run.BEGIN}\nnew\n{bench_run.END}")
    assert new == f"# Results\n\n{bench_run.BEGIN}\nnew\n{bench_run.END}\n\n# Earlier runs\nhistory\n"
    with pytest.raises(ValueError, match="markers"):
        bench_run.rewrite("# no markers\n", "x")


def test_the_shipped_results_and_notes_render(bench_run) -> None:
    """RESULTS.md has the markers, profile_notes.md has notes, and every listed script exists."""
    bench_run.rewrite(bench_run.RESULTS_FILE.read_text(), "x")
    notes = bench_run.load_notes()
    assert "drain-mosquitto" in notes
    missing = [b.script for b in bench_run.BENCHMARKS if not (REPO / "bench" / b.script).exists()]
    assert not missing
    assert len({b.name for b in bench_run.BENCHMARKS}) == len(bench_run.BENCHMARKS)


def test_from_a_saved_log_without_writing(tmp_path: Path, bench_run) -> None:
    log = tmp_path / "run.log"
    log.write_text(OUTPUT)
    import subprocess

    done = subprocess.run([sys.executable, str(REPO / "bench" / "run"), "--from", str(log), "--no-write"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| drain-mosquitto | 61.7 jobs/s |" in done.stdout
    assert json.loads(OUTPUT.splitlines()[2].removeprefix("RESULT "))["name"] == "drain-mosquitto"


def test_notes_are_the_text_under_each_heading(tmp_path: Path, bench_run) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("# Title\n\nintro, no note\n\n## drain-mosquitto\n\npy-spy: the\njournal\n\n## other\nx\n")
    assert bench_run.load_notes(notes) == {"drain-mosquitto": "py-spy: the journal", "other": "x"}


def test_a_figure_s_parts_render_by_name(bench_run) -> None:
    """A dict among a figure's details (the CPU by part) reads as names and numbers, not Python."""
    details = bench_run._details({"name": "x", "figure": 1, "unit": "ms", "cpu_ms": {"service": 15.33, "agents": 32.0}})
    assert details == "cpu ms (service 15.3, agents 32.0)"


def test_settle_waits_for_a_quiet_machine_and_gives_up(bench_run, monkeypatch, capsys) -> None:
    """It goes on once a second was quiet enough, and after SETTLE_MAX_SECONDS of a busy machine."""
    busy = iter([0.9, 0.5, 0.1])
    monkeypatch.setattr(bench_run, "_cpu_busy_over", lambda seconds: next(busy))
    bench_run.settle()
    assert "CPU 10% busy" in capsys.readouterr().out
    monkeypatch.setattr(bench_run, "_cpu_busy_over", lambda seconds: 1.0)
    monkeypatch.setattr(bench_run, "SETTLE_MAX_SECONDS", 0)
    bench_run.settle()
    assert "CPU 100% busy" in capsys.readouterr().out


def test_cpu_busy_is_a_share(bench_run) -> None:
    assert 0.0 <= bench_run._cpu_busy_over(0.05) <= 1.0
