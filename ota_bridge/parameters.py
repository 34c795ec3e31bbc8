"""Job parameters: named placeholders in a workflow's command, filled shell-quoted from a job's values.

A placeholder is `{{name}}`, the name matching PARAMETER_NAME_PATTERN, with no spaces inside the
braces. A job gives `"Parameters": {"name": "value", ...}`; each value is substituted as one
shell word (shlex.quote), never as raw text, so a value can hold quotes, spaces, `;`, newlines or
`$(...)` and still reach the command as one literal argument. The job stores the final command,
and the signed head carries it.

A command with no placeholder and a job with no Parameters are left exactly as they are, even when
the command holds `{{` for some other reason. Once a command has a placeholder (or the job gives
Parameters), any other `{{` or `}}` in it is a syntax error.
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Mapping

from agent.protocol import MAX_COMMAND_CHARS

from .errors import InvalidRequest

PARAMETER_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
MAX_PARAMETERS = 64
MAX_VALUE_CHARS = 4096
_PLACEHOLDER = re.compile(r"\{\{(" + PARAMETER_NAME_PATTERN + r")\}\}")
_NAME = re.compile(PARAMETER_NAME_PATTERN)
_BRACES = re.compile(r"\{\{|\}\}")
# What a command may not hold (see api/schemas.CommandText): control characters but tab, LF and CR.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class BadParameters(InvalidRequest):
    title = "Invalid parameters"


def placeholders(command: str) -> list[str]:
    """The distinct placeholder names of a command, in order of first use."""
    return list(dict.fromkeys(_PLACEHOLDER.findall(command)))


def check_syntax(command: str, what: str = "the command", strict: bool = False) -> None:
    """Raise BadParameters for a `{{` or `}}` that is not part of a placeholder, once the command has
    one (strict: whether or not it has one)."""
    if not strict and not _PLACEHOLDER.search(command):
        return
    stray = _stray_brace(command)
    if stray is not None:
        raise BadParameters(f"{what} has a placeholder syntax error near {stray!r}: "
                            f"a placeholder is {{{{name}}}}, the name matching {PARAMETER_NAME_PATTERN}, "
                            "with no spaces")


def _stray_brace(command: str) -> str | None:
    """The text around the first `{{` or `}}` outside a placeholder; None when there is none."""
    inside = [(p.start(), p.end()) for p in _PLACEHOLDER.finditer(command)]
    for match in _BRACES.finditer(command):
        if not any(start <= match.start() < end for start, end in inside):
            return command[max(0, match.start() - 20):match.end() + 20]
    return None


def check_values(values: Mapping[str, Any] | None) -> dict[str, str] | None:
    """A job's Parameters as strings; raises ValueError naming the first bad name or value.

    Strings are taken as they are; whole numbers (not booleans) as their decimal form; anything
    else (null, fractions, lists, objects) is refused, so nobody wonders how 1.0 or true is spelled.
    """
    if values is None:
        return None
    if len(values) > MAX_PARAMETERS:
        raise ValueError(f"at most {MAX_PARAMETERS} parameters, got {len(values)}")
    return {_name(name): _value(name, value) for name, value in values.items()}


def _name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"parameter name {name[:80]!r} does not match {PARAMETER_NAME_PATTERN}")
    return name


def _value(name: str, value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"parameter {name!r} must be a string or a whole number, not {_json_type(value)}")
    if len(value) > MAX_VALUE_CHARS:
        raise ValueError(f"parameter {name!r} has {len(value)} characters; at most {MAX_VALUE_CHARS}")
    bad = _CONTROL.search(value)
    if bad is not None:
        raise ValueError(f"parameter {name!r} holds the control character U+{ord(bad.group()):04X} "
                         "(only tab, newline and carriage return may appear)")
    return value


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", float: "a fraction", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def render(commands: Mapping[str, str], values: Mapping[str, str] | None) -> dict[str, str]:
    """Fill every command's placeholders (commands: what each is, e.g. "the workflow's command", to
    the command) with the shell-quoted values. Raises BadParameters for a syntax error, a missing
    value, a value no command uses, or a result over MAX_COMMAND_CHARS."""
    if not values and not any(_PLACEHOLDER.search(c) for c in commands.values()):
        return dict(commands)
    values = values or {}
    for what, command in commands.items():
        check_syntax(command, what, strict=bool(values))
        missing = [n for n in placeholders(command) if n not in values]
        if missing:
            raise BadParameters(f"{what} needs a value for {_names(missing)}: give it in Parameters")
    used = {n for c in commands.values() for n in placeholders(c)}
    unknown = [n for n in values if n not in used]
    if unknown:
        raise BadParameters(f"unknown parameter {_names(unknown)}: {_described(commands, used)}")
    return {what: _filled(what, command, values) for what, command in commands.items()}


def _filled(what: str, command: str, values: Mapping[str, str]) -> str:
    result = _PLACEHOLDER.sub(lambda m: shlex.quote(values[m.group(1)]), command)
    if len(result) > MAX_COMMAND_CHARS:
        raise BadParameters(f"{what} with its parameters filled in has {len(result)} characters; "
                            f"at most {MAX_COMMAND_CHARS}")
    return result


def _names(names: list[str]) -> str:
    return ", ".join("{{" + n + "}}" for n in names)


def _described(commands: Mapping[str, str], used: set[str]) -> str:
    if not used:
        return f"{' and '.join(commands)} {'has' if len(commands) == 1 else 'have'} no placeholders"
    return f"the placeholders are {_names(sorted(used))}"
