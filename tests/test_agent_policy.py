"""The device's local command policy: --allow-prefix and --allow-scripts-dir, and their settings."""

from __future__ import annotations

import os

import pytest

from agent import daemon
from agent.policy import CommandPolicy, prefix_is_usable
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
    "apt-get", "apt-get update", "  apt-get update", "\tapt-get install -y nginx=1.2",
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
    ("a;b", False), ("a|b", False), ("a\nb", False), ("$x", False),
])
def test_a_prefix_no_command_could_match_is_not_usable(prefix, usable):
    assert prefix_is_usable(prefix) is usable


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


def test_without_policy_settings_there_is_no_policy():
    assert not load_settings(BASE_ARGS, {}).policy.restricts


@pytest.mark.parametrize("argv, env, names", [
    (["--allow-prefix", ""], {}, ("--allow-prefix", "OTA_AGENT_ALLOW_PREFIX", "empty")),
    (["--allow-prefix", "a;b"], {}, ("--allow-prefix", "OTA_AGENT_ALLOW_PREFIX", "shell special")),
    ([], {"OTA_AGENT_ALLOW_PREFIX": "ok,$(x)"}, ("--allow-prefix", "OTA_AGENT_ALLOW_PREFIX", "'$(x)'")),
    (["--allow-scripts-dir", "/nonexistent/dir"], {}, ("--allow-scripts-dir", "OTA_AGENT_ALLOW_SCRIPTS_DIR")),
    (["--allow-scripts-dir", "relative/dir"], {}, ("--allow-scripts-dir", "absolute path")),
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
