"""The service's logging: text or JSON lines (--log-format), the same fields as the agent's."""

from __future__ import annotations

import logging

from agent.jsonlog import LOG_FORMATS, JsonFormatter, about, configure, skip_unused_fields

__all__ = ["LOG_FORMATS", "JsonFormatter", "about", "setup"]

NOISY = ("amqtt", "transitions")  # chatty at INFO about every client's state


def setup(level: str, log_format: str) -> None:
    configure(level, log_format)
    quiet = max(logging.WARNING, logging.getLevelName(level))
    for name in NOISY:
        logging.getLogger(name).setLevel(quiet)
    skip_unused_fields()  # a line per job result: a record must not look up what no line shows

