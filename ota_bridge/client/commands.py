"""The client's commands: `ota-bridge workflow|job|device|artifact ACTION`, each one or two API requests."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

from .. import settings
from . import ClientError, render
from .http import ServiceClient, path
from .watch import watch

Handler = Callable[[argparse.Namespace, ServiceClient], int]
Actions = Any  # argparse's private _SubParsersAction


def add_commands(commands: Actions) -> None:
    _workflow_commands(_group(commands, "workflow", "define, list and delete workflows (the commands jobs run)"))
    _job_commands(_group(commands, "job", "submit jobs to a device, group or tag; follow and cancel them"))
    _device_commands(_group(commands, "device", "register devices, change their group and tags, rotate passwords"))
    _artifact_commands(_group(commands, "artifact", "upload, list and delete artifacts (the files jobs deliver)"))


def _group(commands: Actions, name: str, text: str) -> Actions:
    parser = commands.add_parser(name, help=f"{text} (talks to a running service)")
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")


def _action(actions: Actions, name: str, text: str, handler: Handler) -> argparse.ArgumentParser:
    parser = actions.add_parser(name, help=text, description=text)
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer instead of a table")
    connection = parser.add_argument_group("the service, and the token (docs/cli.md)")
    settings.add_arguments(connection, options=settings.CLIENT_OPTIONS)
    parser.set_defaults(handler=lambda args: handler(args, ServiceClient(settings.resolve_client(args))))
    return parser


# --- workflows ------------------------------------------------------------------------------


def _workflow_commands(actions: Actions) -> None:
    create = _action(actions, "create", "define a workflow: a named shell command", _workflow_create)
    create.add_argument("--name", required=True)
    create.add_argument("--command", required=True, help="the shell command a device runs")
    create.add_argument("--timeout", type=int, metavar="SECONDS", help="kill the command after this long")
    create.add_argument("--success-on-restart", action="store_true",
                        help="count the job as succeeded when the agent restarts while it runs (a reboot, an update)")
    create.add_argument("--artifact", action="append", default=[], metavar="ARTIFACT_ID",
                        help="a file each device fetches and checks before the command runs (repeatable, in order)")
    _action(actions, "list", "list workflows", lambda a, c: _show(a, c.get(path("workflow")), render.workflows))
    _by_id(actions, "show", "show one workflow", lambda a, c: _show(a, c.get(path("workflow", a.id)), render.record))
    _by_id(actions, "delete", "delete a workflow", lambda a, c: _deleted(a, c.delete(path("workflow", a.id))))


def _workflow_create(args: argparse.Namespace, client: ServiceClient) -> int:
    body = {"Name": args.name, "Command": args.command, "TimeoutSeconds": args.timeout,
            "SuccessOnRestart": args.success_on_restart, "Artifacts": args.artifact or None}
    answer = client.post(path("workflow"), {k: v for k, v in body.items() if v is not None})
    return _said(args, answer, f"created workflow {answer['WorkflowId']}")


# --- artifacts ------------------------------------------------------------------------------


def _artifact_commands(actions: Actions) -> None:
    upload = _action(actions, "upload", "upload a file, streamed; workflows name it by its ArtifactId",
                     _artifact_upload)
    upload.add_argument("file", type=Path, metavar="FILE")
    upload.add_argument("--version", required=True, help="any version text, up to 100 characters")
    upload.add_argument("--name", help="the file's name on the devices (default: FILE's own name)")
    _paged(_action(actions, "list", "list artifacts, newest first", _artifact_list))
    _by_id(actions, "show", "show one artifact's record",
           lambda a, c: _show(a, c.get(path("artifact", a.id)), render.record))
    _by_id(actions, "delete", "delete an artifact (refused while a pending job needs it)",
           lambda a, c: _deleted(a, c.delete(path("artifact", a.id))))


def _artifact_upload(args: argparse.Namespace, client: ServiceClient) -> int:
    query = urlencode({"Name": args.name or args.file.name, "Version": args.version})
    answer = client.upload(f"{path('artifact')}?{query}", args.file)
    return _said(args, answer, f"uploaded artifact {answer['ArtifactId']} ({answer['Name']} {answer['Version']}, "
                               f"{render.size(answer['Size'])}, SHA-256 {answer['Sha256']})")


def _artifact_list(args: argparse.Namespace, client: ServiceClient) -> int:
    return _show(args, client.get(path("artifact"), Limit=args.limit, Offset=args.offset), render.artifacts)


# --- jobs -----------------------------------------------------------------------------------


def _job_commands(actions: Actions) -> None:
    submit = _action(actions, "submit", "run a workflow on a device, a group or a tag", _job_submit)
    submit.add_argument("--workflow", required=True, metavar="WORKFLOW_ID")
    target = submit.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", metavar="DEVICE_ID")
    target.add_argument("--group", metavar="GROUP", help="every device of the group, as it is now")
    target.add_argument("--tag", metavar="TAG", help="every device with the tag, as it is now")
    submit.add_argument("--name", help="the job's name (default: the workflow's)")
    submit.add_argument("--timeout", type=int, metavar="SECONDS", help="overrides the workflow's timeout")
    _attempt_flags(submit)
    submit.add_argument("--rollout", type=_rollout_fields, metavar="JSON|@FILE",
                        help="a JSON object of the job's Rollout, AbortOn, Schedule and Continuous fields "
                             "(docs/rollouts.md), or @ and a file holding one")
    submit.add_argument("--continuous", action="store_true",
                        help="with --group or --tag: devices that join later get the job too, until it is canceled")
    _watch_flags(submit, "then follow it as `job watch` does")
    _paged(_action(actions, "list", "list jobs, newest first", _job_list))
    _by_id(actions, "show", "show a job (or one child job) and its result",
           lambda a, c: _show(a, c.get(path("job", a.id)), render.record))
    _by_id(actions, "children", "show a job's child jobs: one per device, with its result",
           lambda a, c: _show(a, c.get(path("job", a.id, "childjobs")), render.children))
    _by_id(actions, "cancel", "cancel a job's queued and running child jobs (the record stays)",
           lambda a, c: _said(a, c.post(path("job", a.id, "cancel")), f"canceled job {a.id}"))
    _by_id(actions, "pause", "stop a job's rollout releasing devices (those released go on)",
           lambda a, c: _said(a, c.post(path("job", a.id, "pause")), f"paused job {a.id}"))
    _by_id(actions, "resume", "let a paused rollout release devices again",
           lambda a, c: _said(a, c.post(path("job", a.id, "resume")), f"resumed job {a.id}"))
    _by_id(actions, "delete", "delete a job and its record", lambda a, c: _deleted(a, c.delete(path("job", a.id))))
    _watch_flags(_by_id(actions, "watch", "follow a job until every device has answered; exits 0 only if "
                        "every device succeeded", lambda a, c: watch(c, a.id, a.interval, a.json)), None)


def _watch_flags(parser: argparse.ArgumentParser, switch: str | None) -> None:
    if switch:
        parser.add_argument("--watch", action="store_true", help=switch)
    parser.add_argument("--interval", type=_seconds, default=0.5, metavar="SECONDS",
                        help="how often to ask the service while watching (default 0.5)")


def _attempt_flags(submit: argparse.ArgumentParser) -> None:
    """Parameters, Retries and OnFailure (docs/rollouts-attempts.md)."""
    submit.add_argument("--param", action="append", type=_parameter, metavar="NAME=VALUE",
                        help="a value for the workflow's {{NAME}} placeholder, passed as one shell word (repeatable)")
    submit.add_argument("--retries", type=int, metavar="N", help="run a failed or timed-out attempt again, up to N "
                        "times (1 to 10)")
    submit.add_argument("--retry-delay", type=int, metavar="SECONDS", help="wait this long before each retry "
                        "(default 0)")
    submit.add_argument("--retry-on", action="append", choices=("FAILED", "TIMED_OUT"),
                        help="retry only attempts that ended so (repeatable; default both)")
    submit.add_argument("--on-failure", metavar="WORKFLOW_ID", help="run this workflow (a rollback) on a device "
                        "whose attempts all failed, before its next job")


def _parameter(value: str) -> tuple[str, str]:
    name, equals, text = value.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError("expected NAME=VALUE")
    return name, text


def _attempt_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"OnFailure": args.on_failure}
    if args.param:
        body["Parameters"] = dict(args.param)
    if args.retries is not None:
        retries = {"Max": args.retries, "DelaySeconds": args.retry_delay, "On": args.retry_on}
        body["Retries"] = {k: v for k, v in retries.items() if v is not None}
    elif args.retry_delay is not None or args.retry_on:
        raise ClientError("--retry-delay and --retry-on need --retries")
    return body


def _job_submit(args: argparse.Namespace, client: ServiceClient) -> int:
    body = {"WorkflowId": args.workflow, "DeviceId": args.device, "DeviceGroup": args.group, "TagId": args.tag,
            "Name": args.name, "TimeoutSeconds": args.timeout, **(args.rollout or {}),
            **({"Continuous": True} if args.continuous else {}), **_attempt_body(args)}
    answer = client.post(path("job"), {k: v for k, v in body.items() if v is not None})
    if args.watch:
        if not args.json:
            render.console(stderr=True).print(f"submitted job {answer['JobId']}")
        return watch(client, answer["JobId"], args.interval, args.json)
    return _said(args, answer, f"submitted job {answer['JobId']}")


def _job_list(args: argparse.Namespace, client: ServiceClient) -> int:
    page = client.get_answer(path("job"), Limit=args.limit, Offset=args.offset)
    _show(args, page.body, render.jobs)
    first, total = args.offset or 0, int(page.headers.get("X-Total-Count", 0))
    last = first + len(page.body)
    if not args.json and total > last:
        render.console(stderr=True).print(f"jobs {first + 1} to {last} of {total}; --offset {last} shows the next",
                                          markup=False, highlight=False)
    return 0


# --- devices --------------------------------------------------------------------------------


def _device_commands(actions: Actions) -> None:
    add = _by_id(actions, "add", "register a device; its MQTT password is shown once", _device_add)
    add.add_argument("--group", help="the device's group")
    add.add_argument("--tag", action="append", default=[], help="a tag (give --tag again for more)")
    _password_file(add)
    listing = _action(actions, "list", "list devices", _device_list)
    listing.add_argument("--group", help="only this group's devices")
    listing.add_argument("--tag", help="only devices with this tag")
    _by_id(actions, "show", "show one device", lambda a, c: _show(a, c.get(path("device", a.id)), render.record))
    _device_update_flags(_by_id(actions, "update", "change a device's group, tags or whether it may connect",
                                _device_update))
    _by_id(actions, "delete", "delete a device: its queued jobs are canceled, it is disconnected",
           lambda a, c: _deleted(a, c.delete(path("device", a.id))))
    _password_file(_by_id(actions, "rotate", "give a device a new MQTT password (shown once); the old one "
                          "stops working and the device is disconnected", _device_rotate))


def _device_update_flags(update: argparse.ArgumentParser) -> None:
    group = update.add_mutually_exclusive_group()
    group.add_argument("--group", help="move the device to this group")
    group.add_argument("--no-group", action="store_true", help="take the device out of its group")
    tags = update.add_mutually_exclusive_group()
    tags.add_argument("--tag", action="append", help="replace the tags with these (give --tag again for more)")
    tags.add_argument("--no-tags", action="store_true", help="remove every tag")
    enabled = update.add_mutually_exclusive_group()
    enabled.add_argument("--enable", dest="enabled", action="store_const", const=True, help="let it connect")
    enabled.add_argument("--disable", dest="enabled", action="store_const", const=False,
                         help="refuse its connections (and disconnect it now)")


def _password_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--password-file", type=Path, metavar="FILE",
                        help="write the MQTT password to this new file (mode 0600) instead of printing it")


def _device_add(args: argparse.Namespace, client: ServiceClient) -> int:
    _check_new_file(args.password_file)
    body = {"DeviceId": args.id, "DeviceGroup": args.group, "Tags": args.tag}
    return _credentials(args, client.post(path("device"), {k: v for k, v in body.items() if v is not None}),
                        f"registered device {args.id}")


def _device_rotate(args: argparse.Namespace, client: ServiceClient) -> int:
    _check_new_file(args.password_file)
    return _credentials(args, client.post(path("device", args.id, "credentials")),
                        f"new MQTT password for device {args.id}; the old one no longer works")


def _device_list(args: argparse.Namespace, client: ServiceClient) -> int:
    return _show(args, client.get(path("device"), DeviceGroup=args.group, TagId=args.tag), render.devices)


def _device_update(args: argparse.Namespace, client: ServiceClient) -> int:
    body: dict[str, Any] = {}
    if args.group or args.no_group:
        body["DeviceGroup"] = None if args.no_group else args.group
    if args.tag or args.no_tags:
        body["Tags"] = [] if args.no_tags else args.tag
    if args.enabled is not None:
        body["Enabled"] = args.enabled
    if not body:
        raise ClientError("nothing to change: give --group, --no-group, --tag, --no-tags, --enable or --disable")
    return _show(args, client.patch(path("device", args.id), body), render.record)


def _credentials(args: argparse.Namespace, answer: dict[str, Any], what: str) -> int:
    """Show the once-only password, or write it to --password-file and leave it out of the output."""
    if args.password_file:
        _write_secret(args.password_file, answer.pop("MqttPassword"))
        what += f"; its MQTT password is in {args.password_file} (mode 0600)"
    if args.json:
        render.print_json(answer)
        return 0
    out = render.console()
    out.print(render.record(answer, hide=("MqttPassword",)))
    out.print(what)
    if "MqttPassword" in answer:
        out.print(f"MQTT password (shown only this once): {answer['MqttPassword']}", highlight=False, markup=False)
    return 0


def _check_new_file(file: Path | None) -> None:
    """Refuse before the request, so a password is never made that could not be written."""
    if file is None:
        return
    if file.exists():
        raise ClientError(f"--password-file {file} already exists; give a new file (nothing was changed)")
    if not file.parent.is_dir():
        raise ClientError(f"--password-file {file}: the directory {file.parent} does not exist (nothing was changed)")


def _write_secret(file: Path, secret: str) -> None:
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise ClientError(f"cannot write --password-file {file}: {e.strerror}; the password was not "
                          f"shown, so rotate it (ota-bridge device rotate)") from None
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")


# --- shared ---------------------------------------------------------------------------------


def _paged(listing: argparse.ArgumentParser) -> None:
    listing.add_argument("--limit", type=int, help="at most this many (default 100, at most 1000)")
    listing.add_argument("--offset", type=int, help="skip this many")


def _by_id(actions: Actions, name: str, text: str, handler: Handler) -> argparse.ArgumentParser:
    parser = _action(actions, name, text, handler)
    kind = parser.prog.split()[1]  # ota-bridge KIND ACTION
    parser.add_argument("id", metavar="ID", help=f"the {kind}'s id" + (
        " (a parent job, or one device's child job)" if kind == "job" else ""))
    return parser


def _show(args: argparse.Namespace, data: Any, view: Callable[[Any], Any]) -> int:
    render.show(args.json, data, view)
    return 0


def _said(args: argparse.Namespace, answer: Any, line: str) -> int:
    if args.json:
        render.print_json(answer)
    else:
        render.console().print(line, highlight=False, markup=False)
    return 0


def _deleted(args: argparse.Namespace, answer: dict[str, Any]) -> int:
    kind, ident = next((k.removesuffix("Id").lower(), v) for k, v in answer.items() if k.endswith("Id"))
    return _said(args, answer, f"deleted {kind} {ident}")


ROLLOUT_KEYS = ("Rollout", "AbortOn", "Schedule", "Continuous")


def _rollout_fields(value: str) -> dict[str, Any]:
    """--rollout: a JSON object (or @file) with only the rollout fields of a job."""
    try:
        text = Path(value[1:]).read_text() if value.startswith("@") else value
        fields = json.loads(text)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"not a JSON object or a readable @file: {e}") from e
    if not isinstance(fields, dict) or not set(fields) <= set(ROLLOUT_KEYS):
        raise argparse.ArgumentTypeError(f"a JSON object with only {', '.join(ROLLOUT_KEYS)}")
    return fields


def _seconds(value: str) -> float:
    seconds = float(value)
    if not 0.05 <= seconds <= 3600:
        raise argparse.ArgumentTypeError("expected seconds from 0.05 to 3600")
    return seconds
