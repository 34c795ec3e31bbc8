"""The OpenAPI document: it names every route, and the running service answers as it says.

schemathesis sends every operation of the document requests made from it, valid and invalid ones,
with the admin token, to a real service process; each answer must be no 5xx, have a documented
status code and content type, and match the documented schema. The examples are derandomized, so
every run sends the same requests. The document is read from the code at collection time, so that
each operation is a test of its own (schemathesis's fixture-loaded schemas need pytest < 9.2);
test_the_service_serves_the_document checks that the service serves exactly that document.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from ota_bridge.api import PUBLIC_PATHS, make_app
from ota_bridge.api.console import CONSOLE_PATHS
from ota_bridge.api.openapi import OPENAPI_PATH, document
from tests.support.processes import Service

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
EXAMPLES_PER_OPERATION = 30


schema = schemathesis.openapi.from_dict(document())


def router_operations() -> set[tuple[str, str]]:
    """(method, path) of every route the app serves but the web console's files; aiohttp adds a HEAD beside each
    GET by itself."""
    # make_app only keeps its arguments for the handlers, which this test never calls.
    app = make_app(*[None] * len(inspect.signature(make_app).parameters))
    return {(route.method, resource.canonical) for resource in app.router.resources() for route in resource
            if route.method != "HEAD" and resource.canonical not in CONSOLE_PATHS}


def documented_operations() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document()["paths"].items() for method in item}


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    assert router_operations() - documented_operations() == set(), "routes missing from the document"
    assert documented_operations() - router_operations() == set(), "documented operations with no route"


def test_every_operation_names_its_statuses_and_security() -> None:
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            assert statuses & {"200", "201"}, f"{method} {path} has no success answer"
            public = path in PUBLIC_PATHS
            assert ("401" in statuses) is not public, f"{method} {path}: 401 iff a token is needed"
            assert (operation.get("security") == []) is public


def test_every_operation_has_a_readable_unique_id_and_a_tag() -> None:
    """Client generators name their functions and modules by these (getJob -> get_job, in jobs/)."""
    doc = document()
    declared = {t["name"] for t in doc["tags"]}
    ids = []
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            ids.append(operation["operationId"])
            assert re.fullmatch(r"[a-z][A-Za-z]+", operation["operationId"]), f"{method} {path}"
            assert operation["tags"] and set(operation["tags"]) <= declared, f"{method} {path}"
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_the_service_serves_the_document(service: Service) -> None:
    resp = service.api.request("GET", OPENAPI_PATH, token=None)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/json")
    assert resp.body == document()
    assert resp.body["openapi"].startswith("3.1")


@pytest.fixture(scope="module")
def known(service: Service) -> dict[str, str]:
    """Records that exist, so the answers for real ids are checked too (random ids only find 404s)."""
    api, group = service.api, "openapi-group"
    for device in ("openapi-dev", "openapi-dev2", "openapi-spare"):
        api.device(device, group=group, tags=["openapi-tag"])
    wf = api.workflow("echo hi", TimeoutSeconds=60)
    ids = {"workflow": wf, "spare_workflow": api.workflow("true"), "device": "openapi-dev",
           "spare_device": "openapi-spare", "single_job": api.submit(wf, DeviceId="openapi-dev"),
           "group_job": api.submit(wf, DeviceGroup=group), "spare_job": api.submit(wf, TagId="openapi-tag"),
           "canceled_job": api.submit(wf, DeviceId="openapi-dev2")}
    api.ok("POST", f"/v1/job/{ids['canceled_job']}/cancel")
    ids["child_job"] = api.ok("GET", f"/v1/job/{ids['group_job']}/childjobs")[0]["JobId"]
    return ids


# (method, path, the known id for {id}, body or query): the answers of real records, each checked as documented.
SUCCESSES = [
    ("GET", "/v1/workflow/{id}", "workflow", None),
    ("GET", "/v1/job/{id}", "single_job", None),
    ("GET", "/v1/job/{id}", "group_job", None),
    ("GET", "/v1/job/{id}", "child_job", None),
    ("GET", "/v1/job/{id}", "canceled_job", None),
    ("GET", "/v1/job/{id}/childjobs", "group_job", None),
    ("GET", "/v1/job", None, {"Limit": 3, "Offset": 1}),
    ("POST", "/v1/job", None, {"WorkflowId": "workflow", "DeviceGroup": "openapi-group"}),
    ("POST", "/v1/job/{id}/cancel", "single_job", None),
    ("GET", "/v1/device/{id}", "device", None),
    ("GET", "/v1/device", None, {"TagId": "openapi-tag"}),
    ("PATCH", "/v1/device/{id}", "device", {"DeviceGroup": None, "Tags": ["openapi-tag", "other"]}),
    ("DELETE", "/v1/job/{id}", "spare_job", None),
    ("DELETE", "/v1/workflow/{id}", "spare_workflow", None),
    ("DELETE", "/v1/device/{id}", "spare_device", None),
]


@pytest.mark.parametrize("method, path, which, data", SUCCESSES)
def test_answers_for_real_records_match_the_document(service: Service, known: dict[str, str], method: str,
                                                     path: str, which: str | None, data: Any) -> None:
    operation = schema[path][method]
    parts: dict[str, Any] = {"path_parameters": {"id": known[which]}} if which else {}
    if data is not None and method == "GET":
        parts["query"] = data
    elif data is not None:
        parts["body"] = {k: known.get(v, v) if k == "WorkflowId" else v for k, v in data.items()}
    response = operation.Case(**parts).call_and_validate(base_url=service.api.base, headers=auth(service),
                                                         checks=CHECKS)
    assert response.status_code in (200, 201)


def auth(service: Service) -> dict[str, str]:
    return {"Authorization": f"Bearer {service.api.token}"}


@pytest.mark.timeout(60)
@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case: Any, service: Service) -> None:
    case.call_and_validate(base_url=service.api.base, headers=auth(service), checks=CHECKS)
