"""Mosquitto's dynamic security plugin: the only place that speaks its control API.

The service logs in as its own dynsec admin and sends commands to `$CONTROL/dynamic-security/v1`;
Mosquitto answers on `.../response`, each command's answer carrying the correlation data it was
sent with. Clients are made, disabled, re-keyed and deleted while Mosquitto runs: no file is
rewritten by the service and nothing is reloaded. Disabling or deleting a client drops its
connection at once (the plugin kicks it).

Mosquitto 2.0's dynsec ACL topics take no %u or %c, so each device has a role of its own
(`ota-device-<id>`) granting exactly its topics. The plugin serialises its whole configuration after
every command, so a command costs time in proportion to the accounts it holds (docs/operations.md
has the measured figures).

`initial_config` writes the plugin's first configuration file (before Mosquitto starts): the admin,
the service, the read-only operator `api`, and every device already registered, with the hash the
registry keeps (the same PBKDF2-SHA512 the plugin uses).

In cluster mode every instance has two broker identities of its own, made once by
`instance_commands` (`ota-bridge mosquitto-dynsec-instance`, as the first admin): its service login
`ota-bridge-service-<id>` and its admin login `ota-bridge-dynsec-<id>`. With
`use_username_as_clientid`, a client id is its username, so two instances sharing a login would
take over each other's connection (docs/scale.md).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import OPERATOR_USERNAME, SERVICE_CLIENT_ID, Topics

from .dispatch import SHARE_GROUP
from .errors import OtaBridgeError

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
ADMIN_USERNAME = "ota-bridge-dynsec"  # the service's admin login for the plugin
ADMIN_ROLE, SERVICE_ROLE, OPERATOR_ROLE = "ota-dynsec-admin", "ota-service", "ota-operator"
DEVICE_ROLE_PREFIX = "ota-device-"
DEVICES_PER_MESSAGE = 50  # per control message: each answers well within ANSWER_SECONDS, even at large fleets
ANSWER_SECONDS = 60.0  # a control message's answer, the plugin having saved its file after each command
NOT_FOUND = ("Client not found", "Role not found")
EXISTS = ("Client already exists", "ACL with this topic already exists")


class DynsecError(OtaBridgeError):
    """The plugin refused a command, or did not answer."""

    title = "Broker accounts not changed"


@dataclass(frozen=True)
class Account:
    """A device as the plugin knows it: a client of that name with a role of its own."""

    device_id: str
    password: str


@dataclass(frozen=True)
class InstanceLogins:
    """A cluster instance's own broker identities: its service link and its dynsec admin connection."""

    service: str
    admin: str

    @classmethod
    def of(cls, instance_id: str) -> InstanceLogins:
        return cls(f"{SERVICE_CLIENT_ID}-{instance_id}", f"{ADMIN_USERNAME}-{instance_id}")


def device_role(device_id: str) -> str:
    return DEVICE_ROLE_PREFIX + device_id


def _acl(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": True}


def _reads(topic: str) -> list[dict[str, Any]]:
    return [_acl("subscribePattern", topic), _acl("publishClientReceive", topic)]


def device_acls(topics: Topics, device_id: str) -> list[dict[str, Any]]:
    """The device's own topics: read its job and queue, write its status, read and write its presence."""
    return [*_reads(topics.job(device_id)), *_reads(topics.queue(device_id)),
            _acl("publishClientSend", topics.status(device_id)),
            *_reads(topics.presence(device_id)), _acl("publishClientSend", topics.presence(device_id))]


def create_commands(topics: Topics, account: Account) -> list[dict[str, Any]]:
    role = device_role(account.device_id)
    return [{"command": "createRole", "rolename": role, "acls": device_acls(topics, account.device_id)},
            {"command": "createClient", "username": account.device_id, "clientid": account.device_id,
             "password": account.password, "roles": [{"rolename": role}]}]


def shared_subscriptions_acl(topics: Topics) -> dict[str, Any]:
    """The plugin checks a subscription with its `$share/GROUP/` in front: the service role needs it to
    subscribe to the device messages in cluster mode."""
    return _acl("subscribePattern", f"{SHARE_GROUP}/{topics.prefix}/#")


def instance_commands(topics: Topics, logins: InstanceLogins, passwords: InstanceLogins) -> list[dict[str, Any]]:
    """Make (or, run again, re-key) one instance's two clients; give the service role the shared
    subscriptions. Run with exists_ok: each command's effect is there whether it made it or found it."""
    commands: list[dict[str, Any]] = [{"command": "addRoleACL", "rolename": SERVICE_ROLE,
                                       **shared_subscriptions_acl(topics)}]
    for username, password, role in ((logins.service, passwords.service, SERVICE_ROLE),
                                     (logins.admin, passwords.admin, ADMIN_ROLE)):
        client = {"username": username, "password": password, "roles": [{"rolename": role}]}
        commands += [{"command": "createClient", **client, "clientid": username},
                     {"command": "modifyClient", **client}]
    return commands


def delete_commands(device_id: str) -> list[dict[str, Any]]:
    return [{"command": "deleteClient", "username": device_id},
            {"command": "deleteRole", "rolename": device_role(device_id)}]


# --- the plugin's first configuration file ----------------------------------------------------


def _stored_client(username: str, password_hash: str, roles: list[str], enabled: bool = True,
                   clientid: str | None = None) -> dict[str, Any]:
    """A client entry with a `$7$ITERATIONS$SALT$HASH` hash, in the plugin's file format."""
    _, _, iterations, salt, digest = password_hash.split("$")
    entry: dict[str, Any] = {"username": username, "password": digest, "salt": salt, "iterations": int(iterations),
                             "roles": [{"rolename": r} for r in roles]}
    if clientid is not None:
        entry["clientid"] = clientid
    if not enabled:
        entry["disabled"] = True
    return entry


def initial_config(topics: Topics, hashes: dict[str, str], devices: Iterable[tuple[str, str, bool]]) -> str:
    """The plugin's configuration: `hashes` has the admin's, service's and operator's password hashes
    (by username); `devices` are (device id, password hash, enabled) from the registry."""
    control = [_acl(kind, f"{CONTROL_TOPIC}/#") for kind in
               ("publishClientSend", "publishClientReceive", "subscribePattern")]
    everything = f"{topics.prefix}/#"
    roles = [{"rolename": ADMIN_ROLE, "acls": control},
             {"rolename": SERVICE_ROLE, "acls": [_acl("publishClientSend", everything), *_reads(everything),
                                                 shared_subscriptions_acl(topics)]},
             {"rolename": OPERATOR_ROLE, "acls": _reads(everything)}]
    clients = [_stored_client(ADMIN_USERNAME, hashes[ADMIN_USERNAME], [ADMIN_ROLE]),
               _stored_client(SERVICE_CLIENT_ID, hashes[SERVICE_CLIENT_ID], [SERVICE_ROLE], clientid=SERVICE_CLIENT_ID),
               _stored_client(OPERATOR_USERNAME, hashes[OPERATOR_USERNAME], [OPERATOR_ROLE])]
    for device_id, password_hash, enabled in devices:
        roles.append({"rolename": device_role(device_id), "acls": device_acls(topics, device_id)})
        clients.append(_stored_client(device_id, password_hash, [device_role(device_id)], enabled, device_id))
    access = {"publishClientSend": False, "publishClientReceive": False, "subscribe": False, "unsubscribe": True}
    return json.dumps({"clients": clients, "groups": [], "roles": roles, "defaultACLAccess": access}, indent=1) + "\n"


# --- the control connection -------------------------------------------------------------------


class DynsecClient:
    """One MQTT connection as a plugin admin (its client id its username); `run` sends commands and waits
    for their answers."""

    def __init__(self, host: str, port: int, password: str, tls: ssl.SSLContext | None = None,
                 username: str = ADMIN_USERNAME) -> None:
        self.host, self.port, self.username = host, port, username
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username)
        self._client.username_pw_set(username, password)
        if tls is not None:
            self._client.tls_set_context(tls)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()  # subscribed to the answers
        self._settled = threading.Event()  # the last login was answered: ready, or refused
        self._refused: str | None = None  # why the last login was refused
        self._waiting: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}
        self._numbers = itertools.count(1)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(self.host, self.port)
        self._client.loop_start()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    async def run(self, commands: Sequence[dict[str, Any]], *, missing_ok: bool = False,
                  exists_ok: bool = False) -> None:
        """Send the commands in one message; raise DynsecError naming each one refused (with
        missing_ok, 'not found' answers count as done; with exists_ok, 'already exists')."""
        await asyncio.to_thread(self._settled.wait, ANSWER_SECONDS)
        if not self._ready.is_set():
            why = f"it refused the login: {self._refused}" if self._refused else f"within {ANSWER_SECONDS:.0f} s"
            raise DynsecError(f"could not reach Mosquitto's dynamic security plugin at {self.host}:{self.port} "
                              f"as {self.username!r}: {why}")
        number = str(next(self._numbers))
        tagged = [{**c, "correlationData": f"{number}:{i}"} for i, c in enumerate(commands)]
        assert self._loop is not None
        answer: asyncio.Future[list[dict[str, Any]]] = self._loop.create_future()
        self._waiting[number] = answer
        try:
            self._client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=1)
            responses = await asyncio.wait_for(answer, ANSWER_SECONDS)
        except asyncio.TimeoutError as e:
            raise DynsecError(f"Mosquitto's dynamic security plugin did not answer within "
                              f"{ANSWER_SECONDS:.0f} s") from e
        finally:
            self._waiting.pop(number, None)
        tolerated = (NOT_FOUND if missing_ok else ()) + (EXISTS if exists_ok else ())
        refused = [f"{r.get('command')} {_subject(c)}: {r['error']}" for r, c in zip(responses, commands, strict=False)
                   if r.get("error") and r["error"] not in tolerated]
        if refused:
            raise DynsecError("Mosquitto's dynamic security plugin refused " + "; ".join(refused))

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, code: Any, _props: Any) -> None:
        if code.is_failure:
            log.warning("Mosquitto refused the dynamic security admin %r: %s", self.username, code)
            self._refused = str(code)
        else:
            client.subscribe(RESPONSE_TOPIC, qos=1)
            self._refused = None
            self._ready.set()
        self._settled.set()

    def _on_disconnect(self, *_args: Any) -> None:
        self._ready.clear()
        if self._refused is None:  # a refused login stays settled: waiting for the next attempt would not help
            self._settled.clear()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
            number = str(responses[0]["correlationData"]).split(":")[0]
        except (ValueError, KeyError, IndexError, TypeError):
            log.warning("an answer from the dynamic security plugin that names no request: %.200r", message.payload)
            return
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._answer, number, responses)

    def _answer(self, number: str, responses: list[dict[str, Any]]) -> None:
        future = self._waiting.get(number)
        if future is not None and not future.done():
            future.set_result(responses)


def _subject(command: dict[str, Any]) -> str:
    return repr(command.get("username") or command.get("rolename") or "")
