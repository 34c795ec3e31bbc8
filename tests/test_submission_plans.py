"""A job's submission reads through indexes only: its cost follows its target, not the registry.

bench/post_registry.py measured `POST /v1/job` flat from 1,000 to 100,000 registered devices; that
holds because every statement the POST's store call runs finds its rows by an index. Here each
statement is captured (peewee logs every one it runs) and its plan asked for: on SQLite no table is
SCANned (only the query's own subqueries); on PostgreSQL, with sequential scans off (the tables are
tiny: the planner would scan them whatever the indexes), no Seq Scan, and no index scanned whole:
each index scan's condition names the index's first column (else PostgreSQL reads every entry, as
it does device_tag's primary key, (device_id, tag), for a tag when the tag's own index is missing).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterator

import peewee as pw
import pytest

from ota_bridge import models
from ota_bridge.store import Store, devices, jobs, workflows

TARGETS = (("DeviceId", "d0"), ("DeviceGroup", "g"), ("TagId", "t"))
# A SQLite plan line that reads a whole table or index: a SCAN of a table (peewee's aliases t1, t2, ...)
# rather than of the query's own subqueries, CTEs or constant row.
TABLE_SCAN = re.compile(r"^SCAN (t\d+|device|device_tag|child_job|job|workflow)\b")


class _Statements(logging.Handler):
    """The (sql, params) of every statement peewee runs while attached."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, tuple):
            self.seen.append(record.msg)


@pytest.fixture
def statements() -> Iterator[_Statements]:
    logger = logging.getLogger("peewee")
    handler, level = _Statements(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _plan(sql: str, params: Any) -> list[str]:
    """On the store's thread: the statement's plan, a line per step."""
    if isinstance(models.db.obj, pw.SqliteDatabase):
        return [str(row[-1]) for row in models.db.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()]
    with models.db.atomic():
        models.db.execute_sql("SET LOCAL enable_seqscan = off")
        return [row[0] for row in models.db.execute_sql("EXPLAIN " + sql, params).fetchall()]


INDEX_SCAN = re.compile(r"(?:Index Scan|Index Only Scan) using (\S+)|Bitmap Index Scan on (\S+)")


def _leading_column(index: str) -> str:
    """On the store's thread: the first column of a PostgreSQL index."""
    [(definition,)] = models.db.execute_sql("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (index,)).fetchall()
    return definition.split("(", 1)[1].split(",")[0].split(")")[0].strip().strip('"')


def _full_reads(plan: list[str]) -> list[str]:
    """On the store's thread: the plan's steps that read a whole table or index."""
    full = [line for line in plan if "Seq Scan" in line or TABLE_SCAN.match(line.strip())]
    for i, line in enumerate(plan):
        found = INDEX_SCAN.search(line)
        if found is None:
            continue
        depth = len(line) - len(line.lstrip())
        details = []
        for after in plan[i + 1:]:
            if len(after) - len(after.lstrip()) <= depth or after.lstrip().startswith("->"):
                break
            details.append(after.strip())
        condition = next((d for d in details if d.startswith("Index Cond:")), "")
        if _leading_column(found.group(1) or found.group(2)) not in condition:
            full.append(f"{line.strip()} ({condition or 'no condition'})")
    return full


@pytest.mark.parametrize("field,value", TARGETS)
def test_a_submission_reads_only_through_indexes(db: Store, statements: _Statements, field: str, value: str) -> None:
    for i in range(3):
        db.call_sync(devices.register_device, f"d{i}", "g", ["t"])
    workflow_id = db.call_sync(workflows.create_workflow, "wf", "true", None, False).workflow_id
    statements.seen.clear()
    _, device_ids, read = db.call_sync(jobs.submit_job_with_queues, None, workflow_id, field, value, None, 10)
    assert device_ids and len(read) == len(device_ids)  # the queues too were read (a small target)
    reads = [(sql, params) for sql, params in statements.seen if sql.split()[0].upper() in ("SELECT", "WITH")]
    assert any('"device_group"' in sql or '"tag"' in sql or '"device_id" = ' in sql for sql, _ in reads)
    assert any("ranked" in sql for sql, _ in reads)  # the queue read
    for sql, params in reads:
        plan = db.call_sync(_plan, sql, params)
        assert not db.call_sync(_full_reads, plan), f"{sql}\n" + "\n".join(plan)
