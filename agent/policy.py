"""The device's own say over what it runs, on top of the service's signature.

A signed job proves the service sent it; the local policy limits what even the service may make
this device do (should its signing key leak). Set with --allow-command (repeatable),
--allow-commands-file, --allow-prefix and --allow-prefix-with-options (both repeatable) and
--allow-scripts-dir; with none of them, every signed command is allowed. With several, a command
any one rule allows is allowed.

Commands run through /bin/sh, so the prefix and scripts rules refuse what the shell would read as
more than one simple command, and the prefix rule refuses options after the prefix unless the
operator allowed them for that prefix: most programs can be told to run anything through an
option (apt-get -o Dir::Bin::dpkg=/bin/sh, tar --to-command, find -exec, rsync -e, git -c ...).
The exact rules are in CommandPolicy.refusal.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import NamedTuple

# Characters a prefix-allowed command may not hold: they chain, substitute, redirect or
# background commands (; & | ` $ ( ) < > and line breaks) or escape (\). Any other control
# character is refused too.
SHELL_SPECIAL = frozenset(";&|`$()<>\\\n\r")
# Characters that quote or escape: an exact command holding one is compared character for character.
QUOTING = frozenset("'\"\\$`")
# Unquoted at the start of a word, these may expand to a word starting with '-' (a file name, or
# bash's brace expansion when /bin/sh is bash).
_EXPANDS = frozenset("*?[{")
_BLANKS = " \t"
# A plain word: what the shell passes on as it is (no quoting, globbing, expansion, escapes).
_PLAIN = r"[A-Za-z0-9_@%+=:,./-]+"
_BLANK = r"[ \t]"
# Compiled by its first use (--allow-scripts-dir only; re caches it), not at every agent start.
_SCRIPT_COMMAND = rf"{_BLANK}*(/{_PLAIN})(?:{_BLANK}+{_PLAIN})*{_BLANK}*"


class CommandPolicy(NamedTuple):
    """Which commands this device runs. Empty (the default): every signed command.

    Part of the agent's Settings, immutable like them (agent/settings.py says why a NamedTuple)."""

    allow_prefixes: tuple[str, ...] = ()
    scripts_dir: Path | None = None
    allow_commands: tuple[str, ...] = ()  # exact commands, as normalize_command made them
    option_prefixes: tuple[str, ...] = ()  # prefixes whose commands may take options

    @property
    def restricts(self) -> bool:
        return bool(self.allow_prefixes or self.option_prefixes or self.allow_commands) or self.scripts_dir is not None

    def describe(self) -> str:
        """One line for the log."""
        if not self.restricts:
            return "no local policy: every signed command may run"
        count = len(self.allow_commands)
        rules = [f"{count} exact command{'' if count == 1 else 's'}"] if count else []
        rules += [f"prefix {p!r}" for p in self.allow_prefixes]
        rules += [f"prefix {p!r} with options" for p in self.option_prefixes]
        rules += [f"scripts in {self.scripts_dir}"] if self.scripts_dir is not None else []
        return "commands allowed: " + ", ".join(rules)

    def allows(self, command: str) -> bool:
        """True when the command may run here (see refusal)."""
        return self.refusal(command) is None

    def refusal(self, command: str) -> str | None:
        """None when the command may run here, else which rule refused it (for the REJECTED reason).

        With no rule set, every command may run. Otherwise one rule must allow it:

        --allow-command COMMAND: the command equals COMMAND once both are normalized
        (normalize_command: spaces and tabs trimmed at both ends and, in a command holding no
        quote, backslash, $ or `, each run of them inside taken as one space).

        --allow-prefix PREFIX: the command, with its leading spaces and tabs removed, starts
        with PREFIX followed by the end of the command or a space or tab (so "apt-get" allows
        "apt-get update" but not "apt-get-evil"), AND the command holds none of the shell's
        special characters ; & | ` $ ( ) < > \\ nor a line break or other control character
        except tab, so it cannot chain a second command ("apt-get update; rm -rf /"),
        substitute one, redirect or background one, AND no word after PREFIX is an option:
        a word (as the shell splits it, quotes removed) starting with '-', or whose first
        character is an unquoted * ? [ or { (a glob or brace expansion could yield one). A
        quote left open refuses the command too.

        --allow-prefix-with-options PREFIX: the same, except that words after PREFIX may be
        options.

        --allow-scripts-dir DIR: the command is an absolute path, optionally followed by
        arguments, each made of plain characters only (letters, digits and _ @ % + = : , . / -),
        separated by spaces or tabs; the path, with every symbolic link resolved, lies inside
        DIR (also resolved) and is an existing regular file. A relative path is refused: /bin/sh
        would look it up in PATH, not in DIR.
        """
        if not self.restricts or normalize_command(command) in self.allow_commands:
            return None
        if self.scripts_dir is not None and script_allowed(self.scripts_dir, command):
            return None
        problems = [prefix_problem(p, command, options=False) for p in self.allow_prefixes]
        problems += [prefix_problem(p, command, options=True) for p in self.option_prefixes]
        if any(problem is None for problem in problems):
            return None
        return next((p for p in problems if p is not NO_MATCH), None) or self._matches_no_rule()

    def _matches_no_rule(self) -> str:
        rules = ["--allow-command"] if self.allow_commands else []
        rules += ["--allow-prefix"] if self.allow_prefixes or self.option_prefixes else []
        rules += ["--allow-scripts-dir"] if self.scripts_dir is not None else []
        return "it matches no " + " or ".join(rules) + " rule"


NO_MATCH = "the command does not start with the prefix"


def prefix_problem(prefix: str, command: str, options: bool) -> str | None:
    """The --allow-prefix rule for one prefix (see CommandPolicy.refusal): None when it allows the
    command, NO_MATCH when the command does not start with it, else why it refuses the command."""
    rest = command.lstrip(_BLANKS)
    after = rest[len(prefix):]
    if not prefix or not rest.startswith(prefix) or not (after == "" or after[0] in _BLANKS):
        return NO_MATCH
    special = next((c for c in command if c in SHELL_SPECIAL or _is_control(c)), None)
    if special is not None:
        return f"it holds {special!r}, which no --allow-prefix rule allows"
    words = shell_words(after)
    if words is None or shell_words(prefix) is None:
        return "it leaves a quote open"
    option = None if options else next((w for w in words if w.may_be_option), None)
    if option is not None:
        return (f"{option.text[:40]!r} after the prefix {prefix!r} is or may expand to an option; "
                "only an --allow-prefix-with-options prefix takes options")
    return None


class Word:
    """One word of a command as /bin/sh splits it, for a command holding no $ ` or \\."""

    __slots__ = ("text", "lead", "lead_quoted")

    def __init__(self, text: str) -> None:
        self.text = text  # as written, quotes included; grows as shell_words reads on
        self.lead = ""  # its first character once quotes are removed ("" while none)
        self.lead_quoted = False

    @property
    def may_be_option(self) -> bool:
        return self.lead == "-" or (not self.lead_quoted and self.lead in _EXPANDS)


def shell_words(text: str) -> list[Word] | None:
    """The words of `text` split at unquoted spaces and tabs; None when a quote is left open.

    Only ' and " quote (the prefix rule refuses $ ` and \\, so nothing else can)."""
    words: list[Word] = []
    current: Word | None = None
    quote: str | None = None
    for character in text:
        if quote is None and character in _BLANKS:
            current = None
            continue
        if current is None:
            current = Word("")
            words.append(current)
        current.text += character
        if quote is None and character in "'\"":
            quote = character
        elif character == quote:
            quote = None
        elif not current.lead:
            current.lead, current.lead_quoted = character, quote is not None
    return None if quote else words


def prefix_is_usable(prefix: str) -> bool:
    """False for a prefix no command could match: empty, holding a character the rule refuses,
    or leaving a quote open."""
    return bool(prefix) and prefix == prefix.strip() and prefix.isprintable() and not any(
        c in SHELL_SPECIAL for c in prefix) and shell_words(prefix) is not None


def normalize_command(command: str) -> str:
    """An exact command as --allow-command compares it: spaces and tabs trimmed at both ends; in a
    command holding no quote, backslash, $ or `, each run of them inside becomes one space. (With
    quoting, blanks may be inside quotes, where they matter: the command is left as it is.)"""
    trimmed = command.strip(_BLANKS)
    if any(c in QUOTING for c in trimmed):
        return trimmed
    return re.sub(r"[ \t]+", " ", trimmed)


def command_is_usable(command: str) -> bool:
    """False for an exact command no job could match: empty, or holding a control character."""
    return bool(command) and not any(_is_control(c) for c in command)


def script_allowed(scripts_dir: Path, command: str) -> bool:
    """The --allow-scripts-dir rule (see CommandPolicy.refusal)."""
    match = re.fullmatch(_SCRIPT_COMMAND, command)
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
