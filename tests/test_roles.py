"""Roles of API tokens and the audit log, against a real service process.

Every route is tried with a token of every role, from the table the service itself reads
(ota_bridge.roles.NEEDS): a role below the route's gets 403 naming what it needs, one at or above
gets past the check (here to a 400 or 404, since the ids name nothing and the bodies are empty).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import peewee as pw
import pytest
from playhouse.db_url import connect

from agent.protocol import OPERATOR_USERNAME
from ota_bridge import credentials
from ota_bridge.api import PUBLIC_PATHS, make_app
from ota_bridge.roles import NEEDS, Role, needed_role
from ota_bridge.store import Store, tokens
from tests.support.databases import database_url
from tests.support.mosquitto import logs_in
from tests.support.processes import REPO, Api, Service

UNKNOWN_IDS = {"workflow": str(uuid.uuid4()), "job": str(uuid.uuid4()), "device": "no-such-device",
               "webhook": str(uuid.uuid4()), "artifact": str(uuid.uuid4())}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`ota-bridge ARGS` as its own process, as an operator would run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_BRIDGE_")}
    return subprocess.run([sys.executable, "-m", "ota_bridge", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=60)


def make_token(service: Service, name: str, role: Role) -> Api:
    done = cli("token", "create", "--name", name, "--role", role.value, "--data-dir", str(service.data_dir))
    assert done.returncode == 0, done.stderr
    return Api(service.base_url, done.stdout.strip())


@pytest.fixture(scope="module")
def apis(service: Service) -> dict[Role, Api]:
    return {Role.ADMIN: service.api, Role.OPERATOR: make_token(service, "test-operator", Role.OPERATOR),
            Role.VIEWER: make_token(service, "test-viewer", Role.VIEWER)}


def test_every_route_has_a_role_in_the_table() -> None:
    app = make_app(*[None] * len(inspect.signature(make_app).parameters))
    routes = {(route.method, resource.canonical) for resource in app.router.resources() for route in resource
              if route.method != "HEAD" and resource.canonical not in PUBLIC_PATHS}
    assert routes == set(NEEDS), "roles.NEEDS must name exactly the routes that need a token"
    assert needed_role("GET", "/v1/not-in-the-table") is Role.ADMIN


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("method, route", sorted(NEEDS))
def test_each_role_against_each_route(apis: dict[Role, Api], role: Role, method: str, route: str) -> None:
    kind = (route.split("/") + [""])[2]  # "" for a route outside /v1/, like /metrics
    path = route.replace("{id}", UNKNOWN_IDS.get(kind, ""))
    body = {} if method in ("POST", "PATCH") and "{id}" not in route or method == "PATCH" else None
    resp = apis[role].request(method, path, body)
    needed = NEEDS[(method, route)]
    if role.allows(needed):
        assert resp.status != 403 and resp.status < 500, (resp.status, resp.body)
    else:
        assert resp.status == 403, (resp.status, resp.body)
        allowed = " or ".join(r.value for r in needed.holders())
        assert resp.body == {"Error": "Forbidden", "Detail": f"token 'test-{role.value}' has role {role.value}; "
                                                             f"{method} {route} needs {allowed}"}


def test_a_refused_change_changes_nothing(apis: dict[Role, Api]) -> None:
    before = apis[Role.ADMIN].ok("GET", "/v1/workflow")
    resp = apis[Role.VIEWER].request("POST", "/v1/workflow", {"Name": "no", "Command": "true"})
    assert resp.status == 403
    assert apis[Role.ADMIN].ok("GET", "/v1/workflow") == before


def test_a_viewer_reads_jobs_and_their_output_but_never_device_credentials(apis: dict[Role, Api]) -> None:
    operator, viewer = apis[Role.OPERATOR], apis[Role.VIEWER]
    apis[Role.ADMIN].device("roles-dev", group="roles-group")
    job = operator.submit(operator.workflow("echo roles"), DeviceId="roles-dev")
    assert viewer.ok("GET", f"/v1/job/{job}")["Status"] == "QUEUED"
    assert "MqttPassword" not in viewer.ok("GET", "/v1/device/roles-dev")
    assert viewer.request("POST", "/v1/device/roles-dev/credentials").status == 403
    assert viewer.request("POST", f"/v1/job/{job}/cancel").status == 403
    assert operator.ok("POST", f"/v1/job/{job}/cancel")["Status"] == "CANCELED"


def test_a_viewer_token_watches_topics_as_api_on_the_embedded_broker(service: Service,
                                                                      apis: dict[Role, Api]) -> None:
    assert logs_in(service.mqtt_port, OPERATOR_USERNAME, apis[Role.VIEWER].token, client_id="roles-viewer-watcher")


def test_the_audit_log_records_accepted_and_refused_changes_without_secrets(service: Service,
                                                                             apis: dict[Role, Api]) -> None:
    admin, operator, viewer = apis[Role.ADMIN], apis[Role.OPERATOR], apis[Role.VIEWER]
    wf = operator.workflow("echo audited")
    assert viewer.request("POST", "/v1/workflow", {"Name": "x", "Command": "true"}).status == 403
    stranger = "not-a-token-" + uuid.uuid4().hex
    assert Api(service.base_url, stranger).request("DELETE", f"/v1/workflow/{wf}").status == 401
    viewer.ok("GET", f"/v1/workflow/{wf}")  # reads are not recorded
    password = admin.device("audit-dev")
    assert operator.request("POST", "/v1/workflow", {"Command": "true"}).status == 400
    resp = admin.request("GET", "/v1/audit?Limit=5")
    assert resp.status == 200 and int(resp.headers["X-Total-Count"]) >= 5
    rows = [(e["TokenName"], e["Role"], e["Method"], e["Path"], e["TargetId"], e["Status"], e["Outcome"])
            for e in resp.body]
    assert rows == [
        ("test-operator", "operator", "POST", "/v1/workflow", None, 400, "Invalid request"),
        ("admin", "admin", "POST", "/v1/device", "audit-dev", 201, "ok"),
        (None, None, "DELETE", f"/v1/workflow/{wf}", wf, 401, "Unauthorized"),
        ("test-viewer", "viewer", "POST", "/v1/workflow", None, 403, "Forbidden"),
        ("test-operator", "operator", "POST", "/v1/workflow", wf, 200, "ok"),
    ]
    assert all(e["Remote"] == "127.0.0.1" and e["Time"].endswith("Z") for e in resp.body)
    text = json.dumps(admin.ok("GET", "/v1/audit?Limit=1000"))
    for secret in (password, stranger, admin.token, operator.token, viewer.token):
        assert secret not in text
    older = admin.ok("GET", "/v1/audit?Limit=2&Offset=3")
    assert [e["Status"] for e in older] == [403, 200]


def test_token_cli_takes_a_role_and_lists_it(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    default = cli("token", "create", "--name", "ci", "--data-dir", data)
    assert default.returncode == 0 and "role operator" in default.stderr
    assert cli("token", "create", "--name", "ro", "--role", "viewer", "--data-dir", data).returncode == 0
    bad = cli("token", "create", "--name", "x", "--role", "root", "--data-dir", data)
    assert bad.returncode == 2 and "unknown role 'root'; choose viewer, operator, admin" in bad.stderr
    listed = cli("token", "list", "--data-dir", data).stdout.splitlines()
    assert [line.split("\t")[:2] for line in listed] == [["ci", "operator"], ["ro", "viewer"]]


# --- an existing database: the role column is added, and every older token stays admin ---------


class OldApiToken(pw.Model):
    """api_token as released before roles."""

    name = pw.CharField(max_length=100)
    token_hash = pw.CharField(max_length=64, unique=True)
    created = pw.DateTimeField()

    class Meta:
        table_name = "api_token"


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_tokens_of_a_database_made_before_roles_become_admin(kind: str, tmp_path: Path) -> None:
    old_token = credentials.new_secret()
    with database_url(kind, tmp_path) as url:
        old = connect(url)
        with old.bind_ctx([OldApiToken]):
            old.create_tables([OldApiToken])
            OldApiToken.create(name="old", token_hash=credentials.token_hash(old_token), created="2025-01-01")
        old.close()
        for _ in range(2):  # a second open finds the column there
            store = Store(url)
            try:
                found = {t.name: t.role for t in store.call_sync(tokens.token_identities)}
                assert found["old"] is Role.ADMIN
                store.call_sync(tokens.create_token, f"new-{len(found)}", Role.VIEWER)
            finally:
                store.close()
        assert found == {"old": Role.ADMIN, "new-1": Role.VIEWER}
