"""The service's logging: text or JSON lines (--log-format), the same fields as the agent's."""

from __future__ import annotations

import logging

from agent.jsonlog import LOG_FORMATS, JsonFormatter, about, configure

__all__ = ["LOG_FORMATS", "JsonFormatter", "about", "setup"]

NOISY = ("amqtt", "transitions")  # chatty at INFO about every client's state


def setup(level: str, log_format: str) -> None:
    configure(level, log_format)
    quiet = max(logging.WARNING, logging.getLevelName(level))
    for name in NOISY:
        logging.getLogger(name).setLevel(quiet)
    _record_only_what_lines_show()


def _record_only_what_lines_show() -> None:
    """Neither format shows where a call was made, nor the thread or process: the logging HOWTO's
    "Optimization" switches, so that a record does not look them up (a walk up the stack for
    the caller, the thread's name, ...). The service logs a line per job result: a group job of
    ten devices made ten records, which cost as much as storing the ten results."""
    logging._srcfile = None  # no findCaller: the HOWTO's documented switch
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
