"""The `ota-bridge` command: `serve` runs the service; `token create` makes an API token."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from . import __version__, settings, store
from .errors import OtaBridgeError
from .service import open_store, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ota-bridge",
        description="Run commands and software updates on fleets of Linux devices over MQTT.",
        epilog="Every flag can also be set with the OTA_BRIDGE_* variable named in its help.",
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
    settings.add_arguments(create, names=("database", "data_dir"))
    create.set_defaults(handler=_token_create)
    return parser


def _serve(args: argparse.Namespace) -> int:
    config = settings.resolve(args)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet = max(logging.WARNING, logging.getLevelName(config.log_level))
    for noisy in ("amqtt", "transitions"):  # chatty at INFO about every client's state
        logging.getLogger(noisy).setLevel(quiet)
    asyncio.run(serve(config))
    return 0


def _token_create(args: argparse.Namespace) -> int:
    config = settings.resolve(args)
    db = open_store(config)
    try:
        print(db.call_sync(store.create_token, args.name))
    finally:
        db.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except OtaBridgeError as e:
        print(f"ota-bridge: {e.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
