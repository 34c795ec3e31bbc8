"""Log lines as JSON objects, one a line, for log shippers (--log-format json). Standard library only.

Each line: Time (ISO 8601 UTC), Level, Logger, Message, and JobId / DeviceId when the call gave
them (`log.info(..., extra=about(job_id, device_id))`) or its message starts by naming them (see
LEADING_IDS), and Exception when there is a traceback.
The service uses this formatter too (ota_bridge/logs.py), so both write the same fields.
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import datetime, timezone
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = {"job_id": "JobId", "device_id": "DeviceId"}  # record attributes set by extra=about(...)
# The house style of lines about a job or a device: "device ID: job ID ...", "job ID: ..." (the id
# may be quoted), "device ID: ...". Job ids are UUIDs.
# A pattern, compiled by the first JSON line (re caches it), not at every agent start.
LEADING_IDS = r"(?:device (?P<device_id>\S+): )?(?:job '?(?P<job_id>[0-9a-f]{8}-[0-9a-f-]{27})\b'?)?"


def about(job_id: str | None = None, device_id: str | None = None) -> dict[str, str]:
    """The `extra` of a log call about a job or a device: JSON lines carry them as their own fields."""
    return {k: v for k, v in (("job_id", job_id), ("device_id", device_id)) if v is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, Any] = {
            "Time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "Level": record.levelname,
            "Logger": record.name,
            "Message": message,
        }
        named = {**_defaults(record), **_leading_ids(message)}
        for attribute, name in FIELDS.items():
            value = getattr(record, attribute, None) or named.get(attribute)
            if value is not None:
                line[name] = str(value)
        if record.exc_info:
            line["Exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _leading_ids(message: str) -> dict[str, str]:
    """The ids a message names at its start, as in "device sensor-1: job 6f1c...: SUCCEEDED"."""
    found = re.match(LEADING_IDS, message)
    return {k: v for k, v in found.groupdict().items() if v} if found else {}


class DefaultDevice(logging.Filter):
    """Gives every line without a DeviceId this one: the agent's lines are all about its own device."""

    def __init__(self, device_id: str) -> None:
        super().__init__()
        self.device_id = device_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.default_device_id = self.device_id
        return True


def _defaults(record: logging.LogRecord) -> dict[str, str]:
    default = getattr(record, "default_device_id", None)
    return {"device_id": default} if default else {}


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, the time's date and seconds formatted once a second, not once a line (localtime
    and strftime per line are a fifth of a line's cost; lines come in bursts: several per job)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second: int | None = None  # the second whose text is kept
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's
        second = int(record.created)
        if second != self._second:  # called under the handler's lock: one line at a time
            self._second_text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return self.default_msec_format % (self._second_text, record.msecs)


def skip_unused_fields() -> None:
    """Make log records without what neither format shows: the caller's file and line (a walk up the
    stack on every line) and the thread's and process's names (the logging HOWTO's "Optimization").
    For the agent, whose few CPU milliseconds per job include several log lines, and the service,
    which logs a line per job result (ten of them cost as much as storing the ten results)."""
    logging._srcfile = None  # noqa: SLF001 - the documented switch
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def configure(level: str, log_format: str, stream: Any = None, device_id: str | None = None) -> None:
    """Send the root logger's lines to stream (default stderr) as text or JSON; device_id: on every line."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    if device_id is not None:
        handler.addFilter(DefaultDevice(device_id))
    logging.basicConfig(level=level, handlers=[handler], force=True)
