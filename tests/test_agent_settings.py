"""The agent's command line: read without argparse, the same way argparse reads it.

agent/settings.py reads a command line of whole flag names itself (read_flags) and hands any
other (--help, --version, an abbreviation, an error) to argparse (build_parser): every flag,
its OTA_AGENT_* variable, the errors and the help stay what they were. No broker needed.
"""

from __future__ import annotations

import base64
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import daemon, settings
from agent.settings import ENV_PREFIX, SettingsError, build_parser, load_settings, read_flags

REPO_ROOT = Path(__file__).resolve().parents[1]
PUBLIC_KEY = base64.b64encode(Ed25519PrivateKey.generate().public_key().public_bytes(
    serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
# Every flag that takes a value, as users type it (docs/deploy.md, `ota-agent --help`).
VALUE_FLAGS = (
    "--broker", "--ca-file", "--cert-file", "--key-file", "--device-id", "--username", "--password",
    "--password-file", "--state-dir", "--prefix", "--output-cap", "--default-timeout", "--kill-grace",
    "--log-level", "--log-format", "--server-key", "--server-key-file", "--allow-commands-file",
    "--allow-scripts-dir", "--artifact-cache-size", "--head-wait",
)
REPEATABLE_FLAGS = ("--allow-command", "--allow-prefix", "--allow-prefix-with-options")


def argparse_reads(argv: list[str]) -> dict[str, object] | int:
    """What argparse alone makes of a command line: the flags given (by setting name), or its exit code."""
    try:
        args = vars(build_parser().parse_args(settings._join_values(argv)))
    except SystemExit as e:
        return int(e.code or 0)
    return {name: value for name, value in args.items() if value is not None}


def reads(argv: list[str]) -> dict[str, object] | int:
    try:
        return read_flags(argv)
    except SystemExit as e:
        return int(e.code or 0)


def dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


# --- the flags --------------------------------------------------------------------------------


def test_argparse_and_the_reader_know_the_same_flags():
    parser_flags = {option for action in build_parser()._actions for option in action.option_strings
                    if action.nargs is None and action.option_strings != ["--version"]}
    assert parser_flags == {*VALUE_FLAGS, *REPEATABLE_FLAGS}
    assert set(settings._FLAG_NAMES) == parser_flags


@pytest.mark.parametrize("flag", VALUE_FLAGS)
def test_every_flag_takes_its_value_apart_or_after_an_equals_sign(flag):
    assert read_flags([flag, "v-1"]) == read_flags([f"{flag}=v-1"]) == {dest(flag): "v-1"}
    assert read_flags([flag, "a", flag, "b"]) == {dest(flag): "b"}  # the last one wins
    assert read_flags([flag, "v-1"]) == argparse_reads([flag, "v-1"])


@pytest.mark.parametrize("flag", REPEATABLE_FLAGS)
def test_every_repeatable_flag_keeps_its_values_in_order(flag):
    assert read_flags([flag, "a", f"{flag}=b c", flag, "a"]) == {dest(flag): ["a", "b c", "a"]}
    assert read_flags([flag, "a", f"{flag}=b c"]) == argparse_reads([flag, "a", f"{flag}=b c"])


def test_values_may_look_like_flags_or_hold_equals_signs():
    argv = ["--password", "-Xy", "--username", "--device-id", "--prefix=a=b", "--state-dir", "", "--broker=-"]
    assert read_flags(argv) == {"password": "-Xy", "username": "--device-id", "prefix": "a=b", "state_dir": "",
                                "broker": "-"}
    assert read_flags(argv) == argparse_reads(argv)


# Tokens a command line is made of, odd ones included: every line of up to two of them, and of
# three of the first eight, is read the same way by read_flags and by argparse alone (or both exit
# with the same code).
TOKENS = ["--broker", "--broker=h", "h", "-x", "--", "", "--allow-prefix", "--dev", "=", "--allow-prefix=p",
          "--allow", "--dev=d", "--device-id", "-h", "--version", "--bogus=1", "--password=--"]


@pytest.mark.parametrize("length, tokens", [(0, TOKENS), (1, TOKENS), (2, TOKENS), (3, TOKENS[:8])])
def test_every_short_command_line_reads_as_argparse_reads_it(length, tokens, capsys):
    for argv in itertools.product(tokens, repeat=length):
        assert reads(list(argv)) == argparse_reads(list(argv)), argv
    capsys.readouterr()  # argparse's usage and help lines


def test_a_unique_abbreviation_still_works_through_argparse():
    assert read_flags(["--dev", "d", "--allow-prefix-with", "df"]) == {
        "device_id": "d", "allow_prefix_with_options": ["df"]}


# --- help, version, errors ------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["--broker", "h:1", "--help"]])
def test_help_is_argparse_s_and_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        read_flags(argv)
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text == build_parser().format_help()
    assert "--allow-prefix-with-options PREFIX" in help_text and "OTA_AGENT_DEVICE_ID" in help_text
    assert "--head-wait" not in help_text  # for tests only


def test_version_exits_0(capsys):
    with pytest.raises(SystemExit) as exited:
        read_flags(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"ota-agent {settings.agent_version()}\n"


@pytest.mark.parametrize("argv, error", [
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--broker"], "argument --broker: expected one argument"),
    (["--broker", "h:1", "extra"], "unrecognized arguments: extra"),
    (["--", "--broker", "h:1"], "unrecognized arguments: -- --broker=h:1"),
    (["--allow", "x"], "ambiguous option: --allow"),
    (["-x"], "unrecognized arguments: -x"),
])
def test_a_bad_command_line_exits_2_with_argparse_s_usage_and_error(argv, error, capsys):
    with pytest.raises(SystemExit) as exited:
        daemon.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ota-agent [-h] [--broker mqtt[s]://HOST:PORT]")
    assert f"ota-agent: error: {error}" in err


# --- the variables --------------------------------------------------------------------------


def good_values(tmp_path: Path) -> dict[str, str]:
    """A valid value of every setting but the TLS files and the key, which other tests cover."""
    commands = tmp_path / "commands"
    commands.write_text("uptime\n")
    commands.chmod(0o600)
    (tmp_path / "pw").write_text("from-file\n")
    return {"--username": "someone", "--password-file": str(tmp_path / "pw"), "--state-dir": str(tmp_path),
            "--prefix": "fleet", "--output-cap": "5", "--default-timeout": "7", "--kill-grace": "0.5",
            "--log-level": "debug", "--log-format": "json", "--allow-commands-file": str(commands),
            "--allow-scripts-dir": str(tmp_path), "--artifact-cache-size": "2MiB", "--head-wait": "3",
            "--allow-command": "df -h", "--allow-prefix": "apt-get", "--allow-prefix-with-options": "journalctl"}


def test_every_setting_reads_the_same_from_its_flag_and_its_variable(tmp_path):
    base = ["--broker", "mqtt://h:1", "--device-id", "d", "--server-key", PUBLIC_KEY]
    for flag, value in good_values(tmp_path).items():
        from_flag = load_settings([*base, flag, value], {})
        from_env = load_settings(base, {ENV_PREFIX + dest(flag).upper(): value})
        assert (repr(from_flag), from_flag.password) == (repr(from_env), from_env.password), flag
        assert from_flag != load_settings(base, {}), f"{flag} changed nothing"
    env = {ENV_PREFIX + dest(flag).upper(): value for flag, value in
           [("--broker", "mqtt://h:1"), ("--device-id", "d"), ("--server-key", PUBLIC_KEY), ("--password", "pw")]}
    assert load_settings([], env) == load_settings(["--password", "pw", *base], {})


def test_a_bad_value_names_the_flag_and_its_variable():
    with pytest.raises(SettingsError, match=r"--output-cap \(or OTA_AGENT_OUTPUT_CAP\) is 'x'"):
        load_settings(["--broker", "h:1", "--device-id", "d", "--server-key", PUBLIC_KEY, "--output-cap=x"], {})


def test_reading_a_command_line_does_not_import_argparse():
    """argparse (~0.35 MiB resident) is for --help, --version and errors: an idle agent never needs it."""
    code = ("import sys; from agent.settings import load_settings; "
            f"load_settings(['--broker', 'h:1', '--device-id=d', '--server-key', '{PUBLIC_KEY}'], {{}}); "
            "print('argparse' in sys.modules, 'gettext' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr


# --- the version ----------------------------------------------------------------------------


def dist_info(directory: Path, name: str, version: str | None) -> None:
    info = directory / f"{name}-{version or 'x'}.dist-info"
    info.mkdir(parents=True)
    headers = f"Metadata-Version: 2.1\nName: {name}\n" + (f"Version: {version}\n" if version else "")
    (info / "METADATA").write_text(headers + "\nDescription body\nVersion: 9.9.9\n")  # the body is no header


@pytest.mark.parametrize("layout, expected", [
    ({"a": [("ota_bridge", "1.0")]}, "1.0"),  # the agent with the service
    ({"a": [("ota_bridge", "1.0")], "b": [("ota_agent", "2.0")]}, "2.0"),  # ota-agent wins wherever it is
    ({"a": [("ota_agent", "2.0")], "b": [("ota_agent", "3.0")]}, "2.0"),  # the first on sys.path
    ({"a": [("ota_agent", None)], "b": [("ota_agent", "3.0")]}, "3.0"),  # metadata without a Version
    ({"a": [("other", "5.0")]}, settings.UNKNOWN_VERSION),
])
def test_the_version_is_the_installed_distribution_s(tmp_path, monkeypatch, layout, expected):
    for directory, dists in layout.items():
        for name, version in dists:
            dist_info(tmp_path / directory, name, version)
    monkeypatch.setattr(sys, "path", [str(tmp_path / "missing"), *(str(tmp_path / d) for d in layout)])
    settings.agent_version.cache_clear()
    try:
        assert settings.agent_version() == expected
    finally:
        settings.agent_version.cache_clear()
