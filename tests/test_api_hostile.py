"""Hostile input against a real service process: every case is a 4xx with a JSON {"Error", "Detail"}
whose detail names what is wrong, never a 500, and a refused write leaves no trace.

Requests go through http.client here, not the Api client, to send exactly the bytes and headers
under test (no body on purpose, chunked bodies, odd Authorization values, raw header bytes).
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any, Iterable

import pytest

from tests.support.processes import Response, Service

MIB = 1024 * 1024
UUID = "231ec702-5f6e-4b4d-9c1a-0d2c8e3f4a5b"


@pytest.fixture(scope="module")
def records(service: Service) -> dict[str, str]:
    """A device, a workflow and a job, so that refused writes have something to leave alone."""
    api = service.api
    api.device("hostile-dev", group="hostile-group")
    workflow = api.workflow("true")
    return {"device": "hostile-dev", "workflow": workflow, "job": api.submit(workflow, DeviceId="hostile-dev")}


def send(service: Service, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
         headers: dict[str, str] | None = None, token: str | None = "default") -> Response:
    headers = dict(headers or {})
    if token is not None:
        headers.setdefault("Authorization", f"Bearer {service.api.token if token == 'default' else token}")
    conn = http.client.HTTPConnection("127.0.0.1", service.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    kind = resp.getheader("Content-Type", "")
    return Response(resp.status, json.loads(raw) if kind.startswith("application/json") else raw, dict(resp.headers))


def counts(service: Service) -> tuple[int, int, int]:
    """Workflows, jobs and devices: a refused write must change none of them."""
    api = service.api
    jobs = int(api.request("GET", "/v1/job?Limit=1").headers["X-Total-Count"])
    return len(api.ok("GET", "/v1/workflow")), jobs, len(api.ok("GET", "/v1/device"))


def assert_refused(resp: Response, status: int, phrase: str) -> None:
    assert resp.status == status, resp
    assert isinstance(resp.body, dict) and set(resp.body) == {"Error", "Detail"}, resp.body
    assert isinstance(resp.body["Error"], str) and phrase in resp.body["Detail"], resp.body


def refused_write(service: Service, method: str, path: str, body: Any, status: int, phrase: str,
                  **kwargs: Any) -> Response:
    before = counts(service)
    resp = send(service, method, path, body, **kwargs)
    assert_refused(resp, status, phrase)
    assert counts(service) == before, "a refused write changed the records"
    return resp


def workflow_body(**fields: Any) -> bytes:
    return json.dumps({"Name": "wf", "Command": "date", **fields}).encode()


# --- size -----------------------------------------------------------------------------------


def test_body_over_one_mib_is_413_naming_the_limit(service: Service) -> None:
    body = workflow_body(Name="x" * MIB)
    resp = refused_write(service, "POST", "/v1/workflow", body, 413, "1048576 bytes (1 MiB)")
    assert resp.body["Error"] == "Body too large"


def test_chunked_body_over_one_mib_is_413_too(service: Service) -> None:
    chunks = [b'{"Name": "', *[b"x" * 65536] * 17, b'", "Command": "date"}']  # no Content-Length: chunked
    refused_write(service, "POST", "/v1/workflow", iter(chunks), 413, "over the limit of 1048576 bytes")


def test_a_body_just_under_the_limit_is_read(service: Service) -> None:
    body = workflow_body()
    resp = send(service, "POST", "/v1/workflow", body + b" " * (MIB - len(body)))
    assert resp.status == 200 and "WorkflowId" in resp.body


# --- malformed JSON -------------------------------------------------------------------------

NOT_JSON = [
    pytest.param(b"[" * 100_000, "nested too deeply", id="100k-brackets"),
    pytest.param(b'{"Name": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001, "nested too deeply", id="deep-object"),
    pytest.param(workflow_body()[:-1] + b', "TimeoutSeconds": ' + b"9" * 5000 + b"}", "too long", id="5000-digits"),
    pytest.param(b'{"Name": "wf", "Command": "date", "TimeoutSeconds": 1e999}', "too large", id="1e999"),
    pytest.param(b'{"Name": "wf", "Command": "date", "TimeoutSeconds": NaN}', "JSON has no NaN", id="NaN"),
    pytest.param(b'{"Name": "wf", "Command": "date", "TimeoutSeconds": Infinity}', "Infinity is not", id="Infinity"),
    pytest.param(b'{"Name": "wf", "Command": "date", "TimeoutSeconds": -Infinity}', "-Infinity is not", id="-Inf"),
    pytest.param(b'{"Name": "wf", "Name": "again", "Command": "date"}', "'Name' appears more than once", id="dup-key"),
    pytest.param(b'{"Name": "caf\xe9", "Command": "date"}', "not UTF-8 (byte 13)", id="latin-1"),
    pytest.param(b'{"Name": "x", "Command": "date"', "end of input", id="truncated"),
    pytest.param('{\uff02Name\uff02: "wf", "Command": "date"}'.encode(), "U+FF02", id="fullwidth-quote"),
    pytest.param('{"Name": \u201ewf\u201c, "Command": "date"}'.encode(), "typographic quote \u201e (U+201E)",
                 id="low-9-quote"),
    pytest.param('{"Name": \u2033wf\u2033, "Command": "date"}'.encode(), "U+2033", id="double-prime"),
    pytest.param(b"", "has no body", id="empty"),
    pytest.param(b"   \n", "has no body", id="blank"),
]


@pytest.mark.parametrize("raw, phrase", NOT_JSON)
def test_malformed_json_is_400_saying_why(service: Service, raw: bytes, phrase: str) -> None:
    resp = refused_write(service, "POST", "/v1/workflow", raw, 400, phrase)
    assert resp.body["Error"] == "Malformed JSON"


# --- well-formed JSON, wrong content --------------------------------------------------------

BAD_FIELDS = [
    pytest.param("/v1/workflow", {"Name": 123, "Command": "date"}, "Name", id="number-for-string"),
    pytest.param("/v1/workflow", {"Name": "wf", "Command": "date", "SuccessOnRestart": "yes"}, "SuccessOnRestart",
                 id="string-for-bool"),
    pytest.param("/v1/workflow", {"Name": "wf", "Command": "date", "SuccessOnRestart": 1}, "SuccessOnRestart",
                 id="number-for-bool"),
    pytest.param("/v1/workflow", {"Name": "wf", "Command": "date", "TimeoutSeconds": "60"}, "TimeoutSeconds",
                 id="string-for-int"),
    pytest.param("/v1/workflow", {"Name": "wf", "Command": "date", "TimeoutSeconds": 10**30}, "TimeoutSeconds",
                 id="huge-int"),
    pytest.param("/v1/workflow", {"Name": "wf", "Command": "date", "TimeoutSeconds": 1.5}, "TimeoutSeconds",
                 id="float-timeout"),
    pytest.param("/v1/workflow", {"Name": "wf", "Command": "date", "Colour": "red"}, "unknown field 'Colour'",
                 id="unknown-field"),
    pytest.param("/v1/workflow", {"Name": "esc\x1b[31m", "Command": "date"}, "Name", id="escape-in-name"),
    pytest.param("/v1/workflow", {"Name": "x" * 10_000, "Command": "date"}, "at most 200 characters",
                 id="long-name"),
    pytest.param("/v1/workflow", {"Name": "wf", "Command": "x" * 100_000}, "Command", id="long-command"),
    pytest.param("/v1/workflow", {"Name": "wf", "Command": "date", "Nested": [[[[[]]]]]}, "unknown field 'Nested'",
                 id="nested-unknown"),
    pytest.param("/v1/workflow", None, "JSON object, not NoneType", id="null"),
    pytest.param("/v1/workflow", "date", "JSON object, not str", id="string"),
    pytest.param("/v1/device", {"DeviceId": None}, "DeviceId", id="null-device-id"),
    pytest.param("/v1/device", {"DeviceId": "d1", "Tags": "a"}, "Tags", id="string-for-list"),
    pytest.param("/v1/device", {"DeviceId": "d1", "Tags": ["t"] * 101}, "Tags", id="101-tags"),
    pytest.param("/v1/device", {"DeviceId": "d1", "Tags": ["x" * 201]}, "Tags.0", id="long-tag"),
    pytest.param("/v1/device", {"DeviceId": "d1", "DeviceGroup": "a\x00b"}, "DeviceGroup", id="nul-in-group"),
    pytest.param("/v1/device", {"DeviceId": "d\u0430"}, "DeviceId", id="cyrillic-a-in-id"),
    pytest.param("/v1/job", {"WorkflowId": "x" * 1000, "DeviceId": "hostile-dev"}, "WorkflowId", id="long-ref"),
    pytest.param("/v1/job", {"WorkflowId": UUID, "DeviceId": "a", "TagId": "b"}, "exactly one target",
                 id="two-targets"),
]


@pytest.mark.parametrize("path, body, phrase", BAD_FIELDS)
def test_wrong_fields_are_400_naming_the_field(service: Service, path: str, body: Any, phrase: str) -> None:
    refused_write(service, "POST", path, json.dumps(body).encode(), 400, phrase)


def test_a_lone_surrogate_escape_is_400(service: Service) -> None:
    refused_write(service, "POST", "/v1/workflow", b'{"Name": "x\\ud800", "Command": "date"}', 400,
                  "Name: the string holds a lone surrogate")


def test_any_content_type_is_fine_when_the_body_is_json(service: Service) -> None:
    """curl users often leave out the Content-Type header (curl then sends a form type)."""
    for kind in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        resp = send(service, "POST", "/v1/workflow", workflow_body(), headers={"Content-Type": kind})
        assert resp.status == 200 and "WorkflowId" in resp.body
    form = b"Name=wf&Command=date"
    refused_write(service, "POST", "/v1/workflow", form, 400, "found 'N'",
                  headers={"Content-Type": "application/x-www-form-urlencoded"})


# --- bodies where none belongs --------------------------------------------------------------


def test_a_body_on_get_is_400(service: Service) -> None:
    assert_refused(send(service, "GET", "/v1/workflow", b'{"Name": "x"}'), 400, "GET requests take no body")


def test_a_body_on_delete_is_400_and_deletes_nothing(service: Service, records: dict[str, str]) -> None:
    path = f"/v1/workflow/{records['workflow']}"
    refused_write(service, "DELETE", path, b'{"Confirm": true}', 400, "DELETE requests take no body")
    assert send(service, "GET", path).status == 200


# --- ids in paths ---------------------------------------------------------------------------

BAD_IDS = [
    ("GET", "/v1/workflow/not-a-uuid", "'not-a-uuid' is not a workflow id"),
    ("GET", f"/v1/workflow/{UUID.upper()}", "UUIDs in lowercase hex"),
    ("DELETE", f"/v1/workflow/{UUID}x", "is not a workflow id"),
    ("GET", f"/v1/job/{UUID}%00", "is not a job id"),
    ("GET", "/v1/job/" + "a" * 5000, "is not a job id"),
    ("GET", "/v1/job/1/childjobs", "'1' is not a job id"),
    ("POST", "/v1/job/..%2F..%2Fetc/cancel", "is not a job id"),
    ("DELETE", "/v1/job/%27%20OR%201%3D1", "\"' OR 1=1\" is not a job id"),
    ("GET", "/v1/device/a%2Fb", "'a/b' is not a device id"),
    ("PATCH", "/v1/device/sp%20ace", "'sp ace' is not a device id"),
    ("DELETE", "/v1/device/" + "d" * 129, "is not a device id"),
    ("GET", "/v1/device/%E2%80%8Bdev", "is not a device id"),
]


@pytest.mark.parametrize("method, path, phrase", BAD_IDS)
def test_ids_of_the_wrong_shape_are_404_saying_so(service: Service, method: str, path: str, phrase: str) -> None:
    body = b'{"Tags": []}' if method == "PATCH" else None
    resp = refused_write(service, method, path, body, 404, phrase)
    assert resp.body["Error"] == "Not found" and len(resp.body["Detail"]) < 300


def test_well_shaped_ids_that_name_nothing_are_plain_404s(service: Service) -> None:
    assert_refused(send(service, "GET", f"/v1/job/{UUID}"), 404, f"job '{UUID}' does not exist")
    assert_refused(send(service, "GET", "/v1/device/ghost"), 404, "device 'ghost' does not exist")


# --- query parameters -----------------------------------------------------------------------

SOME_JOB = "231ec702-5f6e-4b4d-9c1a-0d2c8e3f4a5b"  # the shape of a job id; no such job
BAD_QUERIES = [
    ("/v1/job?Limit=-1", "Limit must be a whole number from 1 to 1000, got '-1'"),
    ("/v1/job?Limit=1e9", "got '1e9'"),
    ("/v1/job?Limit=1000000000", "from 1 to 1000"),
    ("/v1/job?Limit=" + "9" * 5000, "Limit must be a whole number"),
    ("/v1/job?Limit=%C2%B2", "Limit must be a whole number"),
    ("/v1/job?Limit=", "got ''"),
    ("/v1/job?Offset=abc", "Offset must be a whole number from 0 to"),
    ("/v1/job?Limit=1&Limit=2", "Limit is given more than once"),
    ("/v1/job?Limit=1&limit=2", "Limit is given more than once"),
    ("/v1/job?Limt=5", "unknown query parameter 'Limt'"),
    ("/v1/device?DeviceGroup=a&DeviceGroup=b", "DeviceGroup is given more than once"),
    ("/v1/device?Group=a", "unknown query parameter 'Group'; this endpoint takes DeviceGroup, TagId"),
    (f"/v1/job/{SOME_JOB}?WaitSeconds=61", "WaitSeconds must be a whole number from 0 to 60, got '61'"),
    (f"/v1/job/{SOME_JOB}?WaitSeconds=0.5", "got '0.5'"),
    (f"/v1/job/{SOME_JOB}?Wait=5", "unknown query parameter 'Wait'; this endpoint takes WaitSeconds"),
]


@pytest.mark.parametrize("path", [p for p, _ in BAD_QUERIES])
def test_junk_query_parameters_are_400_naming_them(service: Service, path: str) -> None:
    assert_refused(send(service, "GET", path), 400, dict(BAD_QUERIES)[path])


def test_lowercase_query_parameter_names_still_work(service: Service, records: dict[str, str]) -> None:
    resp = send(service, "GET", "/v1/job?limit=1&offset=0")
    assert resp.status == 200 and len(resp.body) == 1


# --- Authorization --------------------------------------------------------------------------

BAD_AUTH = [
    pytest.param(None, "header is missing or empty", id="none"),
    pytest.param("", "header is missing or empty", id="empty"),
    pytest.param("Bearer", "the token after 'Bearer' is empty", id="bearer-alone"),
    pytest.param("Bearer    ", "the token after 'Bearer' is empty", id="bearer-spaces"),
    pytest.param("c2VjcmV0", "no scheme", id="no-scheme"),
    pytest.param("Basic dXNlcjpwYXNz", "got the scheme 'Basic'", id="basic"),
    pytest.param("Token abc", "got the scheme 'Token'", id="other-scheme"),
    pytest.param("Bearer " + "a" * 4000, "4000 characters long; no API token is over 1024", id="4000-chars"),
    pytest.param("Bearer abc\tdef", "characters no API token has", id="tab"),
    pytest.param("Bearer abc def", "characters no API token has", id="space"),
    pytest.param("Bearer not-a-token", "the API token is not valid", id="unknown"),
]


@pytest.mark.parametrize("header", [p.values[0] for p in BAD_AUTH], ids=[p.id for p in BAD_AUTH])
def test_authorization_oddities_are_401_saying_what_is_wrong(service: Service, header: str | None) -> None:
    phrase = next(p.values[1] for p in BAD_AUTH if p.values[0] == header)
    headers = {} if header is None else {"Authorization": header}
    refused_write(service, "POST", "/v1/workflow", workflow_body(), 401, phrase, headers=headers, token=None)


def raw_request(service: Service, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", service.http_port), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_a_token_that_is_not_utf8_is_401(service: Service) -> None:
    head = b"GET /v1/workflow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
    status, _, rest = raw_request(service, head).partition(b"\r\n")
    assert status == b"HTTP/1.1 401 Unauthorized"
    assert b"characters no API token has" in rest


def test_control_characters_and_huge_headers_never_reach_the_app(service: Service) -> None:
    """aiohttp's HTTP parser refuses these itself, with a plain-text 400, before any middleware runs."""
    control = raw_request(service, b"GET /v1/workflow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\x01b\r\n\r\n")
    assert control.startswith(b"HTTP/1.0 400 Bad Request") and b"Invalid header value char" in control
    huge = send(service, "GET", "/v1/workflow", headers={"Authorization": "Bearer " + "a" * 20_000}, token=None)
    assert huge.status == 400 and b"8190 bytes" in huge.body


def test_other_methods_are_405_in_json(service: Service) -> None:
    resp = send(service, "PUT", "/v1/workflow", workflow_body())
    assert_refused(resp, 405, "PUT /v1/workflow")
