"""Shared fixtures: factories that start real processes and always stop them."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from ota_bridge.store import Store
from tests.support.databases import database_url
from tests.support.processes import Agent, Process, Service


class Launcher:
    """Starts services and agents for one test; everything it started is stopped at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Process] = []

    def service(self, **kwargs: object) -> Service:
        service = Service(self.workdir, **kwargs)  # type: ignore[arg-type]
        self.started.append(service)
        service.start()
        return service

    def agent(self, service: Service, device_id: str, password: str, *extra: str, start: bool = True,
              broker_url: str | None = None) -> Agent:
        """An agent for service's devices, on its broker unless broker_url names another way in."""
        agent = Agent(self.workdir, device_id, password, broker_url or service.broker_url, *extra,
                      server_key_file=service.signing_key_file)
        self.started.append(agent)
        if start:
            agent.start()
        return agent

    def close(self) -> None:
        for process in reversed(self.started):
            process.stop()
        for process in self.started:  # shown by pytest only when the test failed
            print(f"----- {process.name} log -----\n{process.log()[-20000:]}")


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One service process (embedded broker) shared by a module's tests that need no agent."""
    service = Service(Path(tmp_path_factory.mktemp("service")))
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The same store code on a SQLite file and on a fresh PostgreSQL database."""
    with database_url(request.param, tmp_path) as url:
        s = Store(url)
        try:
            yield s
        finally:
            s.close()
