"""Text from a message not yet verified, made safe to log.

A head's JobId (or any field) is chosen by whoever published it until its signature verifies.
Logged raw, a line break in it forges log lines, an escape sequence drives the terminal of whoever
reads the log, and a megabyte of it floods the log. `shown` quotes it (repr: control characters
and line breaks escaped) and caps it.
"""

from __future__ import annotations

UNTRUSTED_CAP = 80  # characters of an untrusted value a log line shows


def shown(value: object, cap: int = UNTRUSTED_CAP) -> str:
    """`value` quoted with repr and cut after `cap` characters (saying how many were left out)."""
    text = repr(value)
    if len(text) <= cap:
        return text
    return f"{text[:cap]}...[{len(text) - cap} more characters]"
