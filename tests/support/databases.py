"""Databases for tests: a SQLite file, or a fresh database on the machine's PostgreSQL.

PostgreSQL is found at OTA_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test).
Where it cannot be reached the test is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def database_url(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'ota-bridge.db'}"
    else:
        with fresh_postgres() as url:
            yield url


@contextlib.contextmanager
def fresh_postgres() -> Iterator[str]:
    """Create a database of its own for one test, and drop it afterwards."""
    psycopg2 = pytest.importorskip("psycopg2")
    admin_url = os.environ.get("OTA_TEST_POSTGRES_URL", DEFAULT_POSTGRES)
    try:
        admin = psycopg2.connect(admin_url, connect_timeout=5)
    except psycopg2.OperationalError as e:
        message = f"PostgreSQL at {admin_url} is not reachable: {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; under CI=true PostgreSQL tests must run")
        pytest.skip(message)
    name = f"ota_test_{uuid.uuid4().hex[:12]}"
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(admin_url)
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
