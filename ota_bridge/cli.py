"""The `ota-bridge` command.

`serve` runs the service; `token`, `signing-key`, `mosquitto-config` and `mosquitto-dynsec-config` work on
its data directory (`mosquitto-dynsec-instance` gives a cluster instance its own broker logins);
`workflow`, `job`, `device` and `artifact` talk to a running service over its REST API
(ota_bridge/client).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from agent.protocol import OPERATOR_USERNAME, SERVICE_CLIENT_ID, format_time

from . import __version__, logs, settings
from .client import ClientError
from .client.commands import add_commands as add_client_commands
from .errors import ConfigError, OtaBridgeError
from .roles import DEFAULT_CLI_ROLE, Role

if TYPE_CHECKING:
    from .store import Store

# The service, the store and the broker files are imported by the commands that use them, so that the
# client's commands (workflow, job, device) start in a fraction of the time.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ota-bridge",
        description="Run commands and software updates on fleets of Linux devices over MQTT.",
        epilog="A flag whose help names an OTA_BRIDGE_* variable can be set with that variable instead. "
               "workflow, job, device and artifact talk to a running service: docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"ota-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("serve", help="run the REST API, the dispatcher and (by default) the MQTT broker")
    settings.add_arguments(run)
    run.set_defaults(handler=_serve)

    token = commands.add_parser("token", help="manage API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_commands.add_parser("create", help="create an API token and print it (shown only once)")
    create.add_argument("--name", required=True, help="what the token is for, e.g. 'ci' or 'alice'")
    create.add_argument("--role", type=_role, default=DEFAULT_CLI_ROLE, metavar="|".join(r.value for r in Role),
                        help=f"what the token may do (default {DEFAULT_CLI_ROLE.value}; docs/security.md#roles)")
    listing = token_commands.add_parser("list", help="list API tokens: name, role and creation time "
                                        "(never the token)")
    revoke = token_commands.add_parser("revoke", help="revoke every token of that name; it stops working at once")
    revoke.add_argument("--name", required=True)
    for sub, handler in ((create, _token_create), (listing, _token_list), (revoke, _token_revoke)):
        settings.add_arguments(sub, names=("database", "data_dir"))
        sub.set_defaults(handler=handler)

    mosquitto = commands.add_parser("mosquitto-config", help="write Mosquitto's password and ACL files "
                                    "from the device registry (see docs/security.md)")
    mosquitto.add_argument("--out", required=True, help="directory for the files 'passwords' and 'acl'")
    settings.add_arguments(mosquitto, names=("database", "data_dir", "prefix"))
    mosquitto.set_defaults(handler=_mosquitto_config)
    dynsec = commands.add_parser("mosquitto-dynsec-config", help="write the first configuration file of "
                                 "Mosquitto's dynamic security plugin, with every registered device (see "
                                 "docs/operations.md), for --mosquitto-dynsec")
    dynsec.add_argument("--out", required=True, help="the file (plugin_opt_config_file in mosquitto.conf)")
    dynsec.add_argument("--replace", action="store_true", help="replace a file that is there (stop Mosquitto "
                        "first: the plugin writes its accounts there)")
    settings.add_arguments(dynsec, names=("database", "data_dir", "prefix"))
    dynsec.set_defaults(handler=_dynsec_config)
    _add_dynsec_instance_command(commands)
    _add_signing_key_commands(commands)
    add_client_commands(commands)
    return parser


def _add_dynsec_instance_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    instance = commands.add_parser("mosquitto-dynsec-instance", help="once per cluster instance: give it its own "
                                   "service and admin logins on Mosquitto's dynamic security plugin, their "
                                   "passwords in its data dir (see docs/scale.md); safe to run again")
    instance.add_argument("--instance-id", dest="instance", required=True, type=_instance_id, metavar="NAME",
                          help="the instance's --instance-id")
    instance.add_argument("--admin-password-file", metavar="FILE", help="the password of the plugin's first admin "
                          "'ota-bridge-dynsec' (default: mqtt-dynsec-admin-password in the data dir, where "
                          "`mosquitto-dynsec-config` writes it)")
    settings.add_arguments(instance, names=("mqtt_url", "data_dir", "prefix", "mqtt_ca_file", "mqtt_cert", "mqtt_key"))
    instance.set_defaults(handler=_dynsec_instance)


def _instance_id(value: str) -> str:
    try:
        return settings.parse_instance_id(value) or ""
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_signing_key_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    key = commands.add_parser("signing-key", help="show or rotate the job-signing key (see docs/security.md)")
    key_commands = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    show = key_commands.add_parser("show", help="print the active, next and previous public keys")
    rotate = key_commands.add_parser("rotate", help="stage a next key to push to agents; with --activate, "
                                     "sign with it (restart the service afterwards)")
    rotate.add_argument("--activate", action="store_true", help="make the staged next key the active one")
    retire = key_commands.add_parser("retire", help="delete the previous key once no agent needs it")
    for sub, handler in ((show, _key_show), (rotate, _key_rotate), (retire, _key_retire)):
        settings.add_arguments(sub, names=("data_dir",))
        sub.set_defaults(handler=handler)


def _serve(args: argparse.Namespace) -> int:
    from .service import serve

    config = settings.resolve(args)
    logs.setup(config.log_level, config.log_format)
    asyncio.run(serve(config))
    return 0


def _with_store(args: argparse.Namespace, work: Callable[[Store, settings.Settings], None],
                existing: bool = True) -> int:
    """Run work on the store; unless `existing` is False, only in a data directory that has one."""
    from .service import open_store

    config = settings.resolve(args)
    db = open_store(config, existing=existing)
    try:
        work(db, config)
    finally:
        db.close()
    return 0


def _role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown role {value!r}; choose {', '.join(r.value for r in Role)}") from None


def _token_create(args: argparse.Namespace) -> int:
    from .store import tokens

    def create(db: Store, _: settings.Settings) -> None:
        print(db.call_sync(tokens.create_token, args.name, args.role))
        print(f"created token {args.name!r} with role {args.role.value}", file=sys.stderr)

    return _with_store(args, create, existing=False)  # may come before the first start


def _token_list(args: argparse.Namespace) -> int:
    from .store import tokens

    def show(db: Store, _: settings.Settings) -> None:
        for token in db.call_sync(tokens.list_tokens):
            print(f"{token.name}\t{token.role}\t{format_time(token.created)}")

    return _with_store(args, show)


def _token_revoke(args: argparse.Namespace) -> int:
    from .store import tokens

    def revoke(db: Store, _: settings.Settings) -> None:
        count = db.call_sync(tokens.revoke_token, args.name)
        print(f"revoked {count} token{'s' if count > 1 else ''} named {args.name!r}")

    return _with_store(args, revoke)


def _mosquitto_config(args: argparse.Namespace) -> int:
    from agent.protocol import Topics

    from .broker_accounts import ACL, OPERATOR_PASSWORD_FILE, PASSWORDS, SERVICE_PASSWORD_FILE, write_mosquitto_files
    from .store import devices

    def write(db: Store, config: settings.Settings) -> None:
        out = Path(args.out)
        write_mosquitto_files(db.call_sync(devices.broker_accounts), out, config.data_dir, Topics(config.prefix))
        print(f"wrote {out / PASSWORDS} and {out / ACL}; the service logs in as {SERVICE_CLIENT_ID!r} "
              f"(password in {config.data_dir / SERVICE_PASSWORD_FILE}), operators as {OPERATOR_USERNAME!r} "
              f"(password in {config.data_dir / OPERATOR_PASSWORD_FILE})")

    return _with_store(args, write, existing=False)  # the documented set-up runs it before the first start


def _dynsec_config(args: argparse.Namespace) -> int:
    from agent.protocol import Topics

    from .broker_accounts import DYNSEC_ADMIN_PASSWORD_FILE, OPERATOR_PASSWORD_FILE, write_dynsec_config
    from .mosquitto_dynsec import ADMIN_USERNAME
    from .store import devices

    def write(db: Store, config: settings.Settings) -> None:
        out = Path(args.out)
        if out.exists() and not args.replace:
            raise OtaBridgeError(f"{out} exists: it holds the accounts Mosquitto's plugin keeps; give --replace "
                                 f"(with Mosquitto stopped) to write it again from the registry")
        write_dynsec_config(out, db.call_sync(devices.dynsec_accounts), config.data_dir, Topics(config.prefix))
        print(f"wrote {out}; the service manages it as {ADMIN_USERNAME!r} (password in "
              f"{config.data_dir / DYNSEC_ADMIN_PASSWORD_FILE}) and logs in as {SERVICE_CLIENT_ID!r}, operators "
              f"as {OPERATOR_USERNAME!r} (password in {config.data_dir / OPERATOR_PASSWORD_FILE})")

    return _with_store(args, write, existing=False)


def _dynsec_instance(args: argparse.Namespace) -> int:
    from agent.protocol import Topics

    from . import tls
    from .broker_accounts import DYNSEC_ADMIN_PASSWORD_FILE, instance_password_files, set_up_instance
    from .mosquitto_dynsec import DynsecClient
    from .service import make_data_dir

    config = settings.resolve(args)
    if config.mqtt_url is None or not args.instance:
        raise ConfigError(f"give the instance's --instance-id and the broker's {settings.named('mqtt_url')}")
    admin_file = Path(args.admin_password_file or config.data_dir / DYNSEC_ADMIN_PASSWORD_FILE)
    try:
        admin_password = admin_file.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the plugin admin's password ({e.strerror or e}): give "
                          f"--admin-password-file, the file `mosquitto-dynsec-config` wrote") from e
    make_data_dir(config.data_dir)
    client = DynsecClient(config.mqtt_url.host, config.mqtt_url.port, admin_password,
                          tls.broker_client_context(config))

    async def set_up() -> None:
        client.start()
        try:
            logins = await set_up_instance(client, Topics(config.prefix), config.data_dir, args.instance)
        finally:
            client.close()
        files = instance_password_files(args.instance)
        print(f"instance {args.instance!r} logs in as {logins.service!r} (password in "
              f"{config.data_dir / files.service}) and changes accounts as {logins.admin!r} (password in "
              f"{config.data_dir / files.admin})")

    asyncio.run(set_up())
    return 0


def _key_data_dir(args: argparse.Namespace) -> Path:
    from .service import DATA_DIR_MARK, check_data_dir

    config = settings.resolve(args)
    check_data_dir(config, DATA_DIR_MARK)
    return config.data_dir


def _key_show(args: argparse.Namespace) -> int:
    from . import signing

    data_dir = _key_data_dir(args)
    for name, which in (("active", signing.ACTIVE), ("next", signing.NEXT), ("previous", signing.PREVIOUS)):
        print(f"{name}\t{signing.public_key(data_dir, which) or '-'}")
    return 0


def _key_rotate(args: argparse.Namespace) -> int:
    from . import signing

    data_dir = _key_data_dir(args)
    if args.activate:
        key = signing.activate_next(data_dir)
        print(f"heads are now signed with {key} once the service restarts; agents that trust only the "
              f"previous key reject them. When no agent needs it: ota-bridge signing-key retire")
    else:
        key = signing.stage_next(data_dir)
        print(f"staged the next key {key} ({signing.key_files(data_dir, signing.NEXT)[1]}); give every agent "
              f"a key file with both keys, then: ota-bridge signing-key rotate --activate")
    return 0


def _key_retire(args: argparse.Namespace) -> int:
    from . import signing

    key = signing.retire_previous(_key_data_dir(args))
    print(f"retired the previous key {key}" if key else "there is no previous key")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ClientError as e:  # the service's answer, or no answer: exit 1, as a failed request
        print(f"ota-bridge: {e.detail}", file=sys.stderr)
        return 1
    except OtaBridgeError as e:
        print(f"ota-bridge: {e.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ota-bridge job list | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush stays quiet
        return 1


if __name__ == "__main__":
    sys.exit(main())
