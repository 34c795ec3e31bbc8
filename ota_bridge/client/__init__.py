"""The CLI client: `ota-bridge workflow|job|device|artifact ...` against a running service, over its REST API only.

http.py is the one place that talks HTTP; render.py draws tables with rich; watch.py follows a job;
commands.py builds the argparse commands and runs them. Nothing here imports the store or the API.
"""

from __future__ import annotations

from ..errors import OtaBridgeError


class ClientError(OtaBridgeError):
    """Root of the client's errors; the CLI prints the detail as one line and exits 1."""


class ServiceRefused(ClientError):
    """The service answered with an error status: {"Error": ..., "Detail": ...}."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}" if detail else error)
        self.status, self.error = status, error


class Unreachable(ClientError):
    """No answer at all: refused, timed out, or a TLS handshake that failed."""
