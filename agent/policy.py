"""The device's own say over what it runs, on top of the service's signature.

A signed job proves the service sent it; the local policy limits what even the service may make
this device do (should its signing key leak). Set with --allow-prefix (repeatable) and
--allow-scripts-dir; with neither, every signed command is allowed. With both, a command either
rule allows is allowed.

Commands run through /bin/sh, so both rules refuse what the shell would read as more than one
simple command. The exact rules are in CommandPolicy.allows.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

# Characters a prefix-allowed command may not hold: they chain, substitute, redirect or
# background commands (; & | ` $ ( ) < > and line breaks) or escape (\). Any other control
# character is refused too.
SHELL_SPECIAL = frozenset(";&|`$()<>\\\n\r")
# A plain word: what the shell passes on as it is (no quoting, globbing, expansion, escapes).
_PLAIN = r"[A-Za-z0-9_@%+=:,./-]+"
_BLANK = r"[ \t]"
_SCRIPT_COMMAND = re.compile(rf"{_BLANK}*(/{_PLAIN})(?:{_BLANK}+{_PLAIN})*{_BLANK}*")


@dataclass(frozen=True)
class CommandPolicy:
    """Which commands this device runs. Empty (the default): every signed command."""

    allow_prefixes: tuple[str, ...] = ()
    scripts_dir: Path | None = None

    @property
    def restricts(self) -> bool:
        return bool(self.allow_prefixes) or self.scripts_dir is not None

    def describe(self) -> str:
        """One line for the log."""
        if not self.restricts:
            return "no local policy: every signed command may run"
        rules = [f"prefix {p!r}" for p in self.allow_prefixes]
        rules += [f"scripts in {self.scripts_dir}"] if self.scripts_dir is not None else []
        return "commands allowed: " + ", ".join(rules)

    def allows(self, command: str) -> bool:
        """True when the command may run here.

        With no rule set, every command may run. Otherwise one rule must allow it:

        --allow-prefix PREFIX: the command, with its leading spaces and tabs removed, starts
        with PREFIX followed by the end of the command or a space or tab (so "apt-get" allows
        "apt-get update" but not "apt-get-evil"), AND the command holds none of the shell's
        special characters ; & | ` $ ( ) < > \\ nor a line break or other control character
        except tab, so it cannot chain a second command ("apt-get update; rm -rf /"),
        substitute one, redirect or background one.

        --allow-scripts-dir DIR: the command is an absolute path, optionally followed by
        arguments, each made of plain characters only (letters, digits and _ @ % + = : , . / -),
        separated by spaces or tabs; the path, with every symbolic link resolved, lies inside
        DIR (also resolved) and is an existing regular file. A relative path is refused: /bin/sh
        would look it up in PATH, not in DIR.
        """
        if not self.restricts:
            return True
        return any(prefix_allows(p, command) for p in self.allow_prefixes) or (
            self.scripts_dir is not None and script_allowed(self.scripts_dir, command))


def prefix_allows(prefix: str, command: str) -> bool:
    """The --allow-prefix rule for one prefix (see CommandPolicy.allows)."""
    if not prefix or any(c in SHELL_SPECIAL or _is_control(c) for c in command):
        return False
    rest = command.lstrip(" \t")
    if not rest.startswith(prefix):
        return False
    after = rest[len(prefix):]
    return after == "" or after[0] in " \t"


def prefix_is_usable(prefix: str) -> bool:
    """False for a prefix no command could match: empty, or holding a character the rule refuses."""
    return bool(prefix) and prefix == prefix.strip() and prefix.isprintable() and not any(
        c in SHELL_SPECIAL for c in prefix)


def script_allowed(scripts_dir: Path, command: str) -> bool:
    """The --allow-scripts-dir rule (see CommandPolicy.allows)."""
    match = _SCRIPT_COMMAND.fullmatch(command)
    if match is None:
        return False
    try:
        root = os.path.realpath(scripts_dir, strict=True)
        script = os.path.realpath(match.group(1), strict=True)
        mode = os.stat(script).st_mode
    except (OSError, ValueError):
        return False
    inside = script != root and os.path.commonpath([root, script]) == root
    return inside and stat.S_ISREG(mode)


def _is_control(character: str) -> bool:
    return character != "\t" and (ord(character) < 0x20 or ord(character) == 0x7F)
