"""The service's lifecycle: open the store, run the broker (embedded or not), connect, serve HTTP.

Everything starts in `serve()` and stops in reverse order when it returns; nothing starts at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import shlex
import signal
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import AsyncIterator, Sequence

from aiohttp import web

from agent.protocol import OPERATOR_USERNAME, RESERVED_DEVICE_IDS, SERVICE_CLIENT_ID, Topics

from . import clock, credentials, metrics, signing, tls
from .api import make_app
from .api.artifacts import ARTIFACT_FILES, ARTIFACT_LINKS
from .api.views import ACCOUNTS
from .artifact_files import ArtifactFiles
from .artifact_links import ArtifactLinks
from .broker_accounts import (
    DYNSEC_ADMIN_PASSWORD_FILE,
    OPERATOR_PASSWORD_FILE,
    SERVICE_PASSWORD_FILE,
    BrokerAccounts,
    broker_secret,
    instance_password_files,
)
from .coordination import Coordinator
from .dispatch import Dispatcher
from .embedded_broker import (
    SERVICE_USERNAME,
    EmbeddedBroker,
    ListenError,
    Login,
    TlsListener,
    TopicPolicy,
    start_broker,
)
from .embedded_broker.service_link import ServiceLink
from .errors import ConfigError
from .files import write_atomically
from .gc_pauses import Collector
from .models import PRIVATE_DIR_MODE
from .mosquitto_dynsec import ADMIN_USERNAME, DynsecClient, InstanceLogins
from .mqtt_link import BrokerLink, Link
from .roles import Role
from .rollouts import Releaser
from .settings import OPTIONS_BY_NAME, SQLITE_FILE, HostPort, Settings, named
from .store import Store, devices, queues, serialize_writes, tokens
from .store.account_locks import AccountLocks
from .webhooks import WebhookSender

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin-token"


def ensure_admin_token(db: Store, data_dir: Path) -> Path | None:
    """On a first start (no token at all), make the admin token; returns the file it is in, or None.

    The token itself is never printed: under systemd stdout is the journal, which others may read.
    """
    if db.call_sync(tokens.has_tokens):
        return None
    token = db.call_sync(tokens.create_token, "admin", Role.ADMIN)
    path = data_dir / ADMIN_TOKEN_FILE
    write_atomically(path, (token + "\n").encode(), 0o600)
    return path


def open_store(settings: Settings, existing: bool = False) -> Store:
    """The store; with `existing`, only in a data directory that holds the database (see check_data_dir)."""
    if existing:
        check_data_dir(settings)
    make_data_dir(settings.data_dir)
    return Store(settings.database_url)


# What `serve` leaves in every data directory it starts in: the job-signing key pair.
DATA_DIR_MARK = signing.key_files(Path("."), signing.ACTIVE)[0].name


def check_data_dir(settings: Settings, mark: str | None = None) -> None:
    """Refuse a directory that is not a data directory, so that a command run in the wrong place
    neither makes an empty database nor answers from one: it must exist, and hold `mark`, or (by
    default) the SQLite file unless --database names another database."""
    path, where = settings.data_dir, f"run it where 'ota-bridge serve' ran, or give {named('data_dir')}"
    if not path.is_dir():
        raise ConfigError(f"the data directory {path} does not exist: {where}")
    if mark is None and settings.database:
        return
    needed = mark or SQLITE_FILE
    if not (path / needed).exists():
        raise ConfigError(f"{path} is not an ota-bridge data directory (it has no {needed}): {where}"
                          f"{'' if mark else ' (and ' + named('database') + ' if it uses PostgreSQL)'}")


WATCH_OPTIONS_FILE = "mosquitto_sub"  # in the data dir: mosquitto_sub's options, read with XDG_CONFIG_HOME
WATCH_TOKEN_NAME = "mosquitto_sub"  # the viewer token the embedded broker's watch options log in with


def watch_options(db: Store, settings: Settings) -> Path | None:
    """The options file that lets `XDG_CONFIG_HOME=<data-dir> mosquitto_sub` log in as the read-only
    user `api` without a password on its command line (where `ps` shows it); made once, mode 0600.
    None when the service does not know the broker's password for `api` (another broker's accounts)."""
    path = settings.data_dir / WATCH_OPTIONS_FILE
    if path.exists():
        return path
    if settings.mqtt_url is None:
        password = db.call_sync(tokens.create_token, WATCH_TOKEN_NAME, Role.VIEWER)
    elif settings.mosquitto_dir is not None or settings.mosquitto_dynsec:
        if settings.instance_id is not None and not (settings.data_dir / OPERATOR_PASSWORD_FILE).exists():
            return None  # the set-up's data dir has it; a new one here would be a password the broker never had
        password = broker_secret(settings.data_dir, OPERATOR_PASSWORD_FILE)
    else:
        return None
    write_atomically(path, f"-u {OPERATOR_USERNAME}\n-P {password}\n".encode(), 0o600)
    return path


def start_guide(settings: Settings, watch_file: Path | None) -> str:
    """The exact commands for an agent and a watcher on the broker this service really uses."""
    host, port = _broker_address(settings)
    scheme = "mqtts" if settings.mqtt_url is not None and settings.mqtt_url.tls else "mqtt"
    ca = [str(settings.mqtt_ca_file)] if scheme == "mqtts" and settings.mqtt_ca_file else []
    agent = shlex.join([_sibling("ota-agent"), "--broker", f"{scheme}://{host}:{port}", "--device-id", "DEVICE-ID",
                        "--password-file", "DEVICE-ID.password", "--server-key-file",
                        str(signing.key_files(settings.data_dir, signing.ACTIVE)[1]),
                        "--state-dir", "./ota-agent-state", *(["--ca-file", *ca] if ca else [])])
    tls = (["--cafile", *ca] if ca else ["--capath", "/etc/ssl/certs"]) if scheme == "mqtts" else []
    watch = shlex.join(["mosquitto_sub", "-h", host, "-p", str(port), *tls, "-v", "-t", f"{settings.prefix}/#"])
    if watch_file is not None:
        watch = f"XDG_CONFIG_HOME={shlex.quote(str(watch_file.parent))} {watch}"
        how = f"user {OPERATOR_USERNAME} and its password are in {watch_file}"
    else:
        how = f"add -u {OPERATOR_USERNAME} and its password, best in an options file (man mosquitto_sub)"
    return (f"MQTT broker for agents: {scheme}://{host}:{port} (from another machine: this host's address). "
            f"Start a device's agent, its password (from POST /v1/device) in the file DEVICE-ID.password:\n"
            f"  {agent}\n"
            f"Watch every device's queue and results ({how}):\n  {watch}")


def _broker_address(settings: Settings) -> tuple[str, int]:
    if settings.mqtt_url is not None:
        return settings.mqtt_url.host, settings.mqtt_url.port
    listen = settings.mqtt_listen
    return ("127.0.0.1" if listen.host in {"0.0.0.0", "::", ""} else listen.host), listen.port


def _sibling(program: str) -> str:
    """The program installed next to this Python (the venv's bin), else its bare name."""
    path = Path(sys.argv[0]).parent / program
    if not path.exists():
        path = Path(sys.executable).parent / program
    return str(path) if path.exists() else program


def make_data_dir(path: Path) -> None:
    """Create the data directory 0700; warn about one that others may list (its files are 0600 anyway).

    Search-only access for the group (0710, the documented Mosquitto set-up) is not warned about.
    Raises ConfigError, in one line, for a directory that cannot be made or written.
    """
    for doing, attempt in (("create", lambda: path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)),
                           ("write in", lambda: tempfile.TemporaryFile(dir=path).close())):  # only trying tells
        try:
            attempt()
        except OSError as e:
            raise ConfigError(f"cannot {doing} the data directory {path} ({named('data_dir')}): "
                              f"{e.strerror or e}") from e
    mode = path.stat().st_mode & 0o777
    if mode & 0o066:
        log.warning("the data directory %s has mode %04o: other users can list it; 'chmod 700 %s' makes it "
                    "the service's alone", path, mode, path)


async def serve(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM."""
    db = open_store(settings)
    try:
        async with _running(settings, db):
            token_file = ensure_admin_token(db, settings.data_dir)
            if token_file:
                print(f"Created the admin API token in {token_file} (mode 0600); read it from there", flush=True)
            print(start_guide(settings, watch_options(db, settings)), file=sys.stderr, flush=True)
            await _wait_for_signal()
    finally:
        db.close()


@contextlib.asynccontextmanager
async def _running(settings: Settings, db: Store) -> AsyncIterator[None]:
    https = tls.server_context(settings)  # first: a bad certificate file stops the start at once
    clock.use_file(settings.test_clock)
    may_create = settings.new_signing_key or not db.call_sync(queues.has_history)
    signer = signing.load_or_create(settings.data_dir, may_create)
    cluster = await _join_cluster(settings, db)
    files = ArtifactFiles(settings.artifact_directory, settings.max_artifact_size)
    files.prepare()
    links = ArtifactLinks.for_signer(signer, settings.api_address, settings.artifact_base_url)
    dispatcher = Dispatcher(db, Topics(settings.prefix), signer.sign, settings.timeout_grace, settings.failpoints,
                            cluster, links.url)
    loop = asyncio.get_running_loop()  # a change the store could not confirm may have moved queues: republish all
    db.on_doubt = lambda: loop.is_closed() or loop.call_soon_threadsafe(dispatcher.on_connected)
    async with contextlib.AsyncExitStack() as stack:
        link, embedded = await _broker_link(settings, db, dispatcher, stack)
        dispatcher.attach(link)
        accounts = BrokerAccounts(db, dispatcher.topics, settings.data_dir, embedded=embedded,
                                  mosquitto_dir=settings.mosquitto_dir, dynsec=_dynsec(settings, stack),
                                  locks=_account_locks(settings, stack),
                                  slow="slow-broker-accounts" in settings.failpoints)
        await accounts.start()
        tasks = [dispatcher.run_publisher(), dispatcher.run_inbox(), dispatcher.run_timeouts(), WebhookSender(db).run(),
                 Releaser(db, dispatcher).run()]
        if cluster is None:
            await db.call(devices.forget_presence)  # no device is online before it says so in this run
        else:
            stack.push_async_callback(cluster.aclose)
            cluster.start_listening(settings.database_url)
            tasks += [cluster.run_leases(), cluster.run_outbox()]
        for job in tasks:
            stack.push_async_callback(_cancel, asyncio.create_task(job))
        link.start()
        stack.push_async_callback(link.aclose)
        app = make_app(db, dispatcher, signer)
        app[ACCOUNTS] = accounts
        app[ARTIFACT_FILES], app[ARTIFACT_LINKS] = files, links
        await stack.enter_async_context(_http(app, settings.http, https))
        _freeze_long_lived(loop, stack)
        yield


def _freeze_long_lived(loop: asyncio.AbstractEventLoop, stack: contextlib.AsyncExitStack) -> None:
    """Start-up's objects out of the collector's way, and later a connect storm's (gc_pauses: full
    collections at fleet size would stall the loop for seconds); their cost served at /metrics."""
    collector = Collector(loop)
    collector.start()
    stack.callback(collector.stop)
    metrics.watch_gc(collector.stats)


async def _join_cluster(settings: Settings, db: Store) -> Coordinator | None:
    """Cluster mode (--instance-id): writes serialized across instances, the lease tables made."""
    if settings.instance_id is None:
        return None
    serialize_writes()
    cluster = Coordinator(db, settings.instance_id)
    await cluster.start()
    log.info("cluster mode: instance %s", settings.instance_id)
    return cluster


async def _broker_link(settings: Settings, db: Store, dispatcher: Dispatcher,
                       stack: contextlib.AsyncExitStack) -> tuple[Link, EmbeddedBroker | None]:
    """The service's link to the broker, starting the embedded broker first unless --mqtt-url is set;
    to the embedded broker, in-process (no paho, no socket)."""
    url = settings.mqtt_url
    if url is not None:
        username, password = url.username, url.password
        if username is None and (settings.mosquitto_dir is not None or settings.mosquitto_dynsec):  # its own
            username, password = _service_login(settings)
        return _link(url.host, url.port, username, password, dispatcher, tls.broker_client_context(settings)), None
    broker = await _start_embedded(settings, BrokerLogins(db))  # the service itself is in-process
    stack.push_async_callback(broker.shutdown)
    link = ServiceLink(broker.core, dispatcher.subscriptions, on_message=dispatcher.deliver,
                       on_connect=dispatcher.on_connected)
    return link, broker


def _dynsec(settings: Settings, stack: contextlib.AsyncExitStack) -> DynsecClient | None:
    """The dynamic security plugin's admin connection, with --mosquitto-dynsec."""
    if not settings.mosquitto_dynsec or settings.mqtt_url is None:
        return None
    username, password = _admin_login(settings)
    client = DynsecClient(settings.mqtt_url.host, settings.mqtt_url.port, password,
                          tls.broker_client_context(settings), username)
    client.start()
    stack.callback(client.close)
    return client


def _account_locks(settings: Settings, stack: contextlib.AsyncExitStack) -> AccountLocks | None:
    """Cluster mode with the plugin: the devices' locks for the changes that must reach it in order."""
    if settings.instance_id is None or not settings.mosquitto_dynsec:
        return None
    locks = AccountLocks(settings.database_url)
    stack.callback(locks.close)
    return locks


def _service_login(settings: Settings) -> tuple[str, str]:
    """The service's own broker login when ota-bridge keeps Mosquitto's accounts; in cluster mode the instance's."""
    if settings.instance_id is not None:
        return _instance_login(settings, "service")
    return SERVICE_USERNAME, broker_secret(settings.data_dir, SERVICE_PASSWORD_FILE)


def _admin_login(settings: Settings) -> tuple[str, str]:
    """The plugin admin the service changes accounts as; in cluster mode the instance's own."""
    if settings.instance_id is not None:
        return _instance_login(settings, "admin")
    path = settings.data_dir / DYNSEC_ADMIN_PASSWORD_FILE
    if not path.exists():
        raise ConfigError(f"{named('mosquitto_dynsec')} needs {path}: make it, and Mosquitto's first dynamic "
                          "security file, with `ota-bridge mosquitto-dynsec-config` (docs/operations.md)")
    return ADMIN_USERNAME, path.read_text().strip()


def _instance_login(settings: Settings, which: str) -> tuple[str, str]:
    """A cluster instance's own login (`which`: service or admin), set up once per instance: a login
    shared by two instances would be one client id, each connection taking over the other's."""
    assert settings.instance_id is not None
    path = settings.data_dir / getattr(instance_password_files(settings.instance_id), which)
    if not path.exists():
        raise ConfigError(f"cluster mode with {named('mosquitto_dynsec')} needs {path}: give this instance its own "
                          f"broker logins first, with `ota-bridge mosquitto-dynsec-instance --instance-id "
                          f"{settings.instance_id}` (docs/scale.md)")
    return getattr(InstanceLogins.of(settings.instance_id), which), path.read_text().strip()


async def _start_embedded(settings: Settings, logins: BrokerLogins) -> EmbeddedBroker:
    tls_listener = None
    if settings.mqtt_tls_listen is not None and settings.tls_cert is not None and settings.tls_key is not None:
        tls_listener = TlsListener(settings.mqtt_tls_listen, settings.tls_cert, settings.tls_key)
    try:
        return await start_broker(settings.mqtt_listen, logins, TopicPolicy(Topics(settings.prefix)),
                                  tls_listener, service_in_process=True)
    except ListenError as e:
        if e.listener == "tls" and tls_listener is not None:
            raise _port_error(e, tls_listener.listen, "mqtt_tls_listen") from e
        raise _port_error(e, settings.mqtt_listen, "mqtt_listen") from e


def _link(host: str, port: int, username: str | None, password: str | None, dispatcher: Dispatcher,
          tls_context: ssl.SSLContext | None = None) -> BrokerLink:
    """One persistent session; in cluster mode one clean session per instance, with its own client id
    (a dead instance's session must not hold messages that the others could take)."""
    cluster = dispatcher.cluster
    client_id = SERVICE_CLIENT_ID if cluster is None else f"{SERVICE_CLIENT_ID}-{cluster.instance_id}"
    return BrokerLink(host, port, username, password, dispatcher.subscriptions,
                      on_message=dispatcher.deliver, on_connect=dispatcher.on_connected, tls=tls_context,
                      client_id=client_id, clean_session=cluster is not None)


RECHECK_ALL_SECONDS = 300.0  # how often the re-check looks at every login, whatever the changes say


class BrokerLogins:
    """Who may log in to the embedded broker, asked of the database (embedded_broker.Logins). Never in
    the service's name: the service is attached to its broker in-process (and the broker refuses that
    name over a connection before asking).

    The re-check asks `changed` first: the devices disabled, re-keyed or deleted since it last asked
    (the store notes each, store/devices.py's note_credential_changes), and the operators, whose few
    tokens are read every time. Every RECHECK_ALL_SECONDS it is told to check every login anyway."""

    def __init__(self, db: Store) -> None:
        self.db = db
        self._verified: dict[str, tuple[str, bytes]] = {}  # device id -> (its stored hash, digest of a password)
        self._seen: int | None = None  # the last credential change read; None: read none yet
        self._all_at = 0.0  # when `changed` last answered "every login" (time.monotonic)

    async def check(self, login: Login) -> bool:
        if login.username == SERVICE_USERNAME:
            return False
        if login.username == OPERATOR_USERNAME:  # any client id but one that would take over a session
            return (login.client_id not in RESERVED_DEVICE_IDS
                    and await self.db.call(tokens.check_token, login.password)
                    and not await self.db.call(devices.device_exists, login.client_id))
        if login.client_id != login.username:
            return False
        stored = await self.db.call(devices.checked_password_hash, login.username, login.password)
        if stored is None:
            return False
        self._verified[login.username] = (stored, _digest(login.password))  # the re-check needs no PBKDF2
        return True

    async def changed(self) -> set[str] | None:
        """The usernames whose logins may have stopped passing since the last call: the devices whose
        credentials changed and the operators' (tokens are not noted). None: every login, at the first
        call, every RECHECK_ALL_SECONDS, and when the changes read may not be all of them (a gap in their
        ids): read before the logins are, so no change falls between."""
        now = time.monotonic()
        if self._seen is not None and now - self._all_at < RECHECK_ALL_SECONDS:
            rows = await self.db.call(devices.credential_changes, self._seen)
            if _follows(rows, self._seen):
                since = [(i, device_id) for i, device_id in rows if i > self._seen]
                self._seen = since[-1][0] if since else self._seen
                changed = {device_id for _, device_id in since}
                for device_id in changed:  # its hash changed or it is gone: a deleted device's entry must not stay
                    self._verified.pop(device_id, None)
                return changed | {OPERATOR_USERNAME}
            # A gap: changes pruned unread (this loop stalled, a clock stepped), or the table emptied
        self._seen, self._all_at = await self.db.call(devices.last_credential_change), now
        return None

    async def still_valid(self, logins: Sequence[Login]) -> list[bool]:
        """A query for the devices' hashes, two more when an operator is among the logins; a device's
        password is hashed again only when its stored hash changed."""
        device_ids = list({login.username for login in logins
                           if login.username not in (OPERATOR_USERNAME, SERVICE_USERNAME)})
        accounts = await self.db.call(devices.device_password_hashes, device_ids) if device_ids else {}
        watching = [login.client_id for login in logins if login.username == OPERATOR_USERNAME]
        hashes = {t.token_hash for t in await self.db.call(tokens.token_identities)} if watching else set()
        taken = set(await self.db.call(devices.existing_device_ids, watching)) if watching else set()
        return [self._still_valid(login, accounts, hashes, taken) for login in logins]

    def _still_valid(self, login: Login, accounts: dict[str, str], hashes: set[str], taken: set[str]) -> bool:
        if login.username == SERVICE_USERNAME:
            return False
        if login.username == OPERATOR_USERNAME:
            return (credentials.token_hash(login.password) in hashes and login.client_id not in taken
                    and login.client_id not in RESERVED_DEVICE_IDS)
        stored = accounts.get(login.username)
        return login.client_id == login.username and stored is not None and self._device_ok(login, stored)

    def _device_ok(self, login: Login, stored: str) -> bool:
        digest = _digest(login.password)
        if self._verified.get(login.username) == (stored, digest):
            return True
        if not credentials.verify_password(login.password, stored):
            return False
        self._verified[login.username] = (stored, digest)
        return True


def _follows(rows: Sequence[tuple[int, str]], seen: int) -> bool:
    """Whether the credential changes read from id `seen` on (devices.credential_changes) surely hold
    every change after it: they start with it or the one after it (pruning takes the oldest first),
    or there are none and none had been noted (seen 0). None, the one seen gone too, means the table
    was emptied (the newest is never pruned)."""
    return (bool(rows) and rows[0][0] in (seen, seen + 1)) or (not rows and seen == 0)


def _digest(password: str) -> bytes:
    """What BrokerLogins remembers of a password it verified: never the password itself."""
    return hashlib.sha256(password.encode()).digest()


@contextlib.asynccontextmanager
async def _http(app: web.Application, listen: HostPort, https: ssl.SSLContext | None) -> AsyncIterator[None]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, listen.host, listen.port, ssl_context=https).start()
        except OSError as e:
            raise _port_error(e, listen, "http") from e
        log.info("REST API listening on %s://%s", "https" if https else "http", listen)
        yield
    finally:
        await runner.cleanup()


_BROKER_HINT = ", or use the broker already there with --mqtt-url mqtt://USER:PASS@HOST:PORT"


def _port_error(e: Exception, listen: HostPort, name: str) -> ConfigError:
    text, flag, env = str(e), OPTIONS_BY_NAME[name].flag, OPTIONS_BY_NAME[name].env
    if getattr(e, "errno", None) == errno.EADDRINUSE or "address already in use" in text.lower():
        return ConfigError(f"port {listen.port} on {listen.host} is already in use; choose another with {flag} "
                           f"or {env}{_BROKER_HINT if name == 'mqtt_listen' else ''}")
    return ConfigError(f"cannot listen on {listen} ({flag} / {env}): {text}")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
