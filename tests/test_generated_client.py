"""A client generated from the served document, as users make one, types every answer.

openapi-python-client (a mainstream generator; the `test` extra installs it) generates a client
from GET /v1/openapi.json of a live service, with warnings as errors. Every response schema with
properties must have become a model class (a generator drops some shapes silently, leaving Any),
and the reference flow, run with real agents through the generated functions, must parse each
answer into its declared model.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from types import ModuleType
from typing import Any, Iterator

import pytest
from openapi_spec_validator import validate

from agent.protocol import JobStatus
from ota_bridge.api.openapi import OPENAPI_PATH
from tests.conftest import Launcher
from tests.support.processes import Service, wait_until

PACKAGE = "ota_bridge_client"
# The only skip: the generator and the code it writes (typing.Self) need Python 3.11 (the pin in pyproject.toml).
pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="openapi-python-client needs Python 3.11")
Schema = dict[str, Any]


@pytest.fixture(scope="module")
def document(service: Service) -> Schema:
    doc = service.api.ok("GET", OPENAPI_PATH)
    validate(doc)
    return doc


@pytest.fixture(scope="module")
def client_package(service: Service, document: Schema, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[ModuleType]:
    """The generated package, importable while the module's tests run."""
    workdir = tmp_path_factory.mktemp("generated")
    config = workdir / "config.json"
    config.write_text(json.dumps({"post_hooks": []}))  # no formatter run: the code is only imported
    command = [sys.executable, "-m", "openapi_python_client", "generate", "--url", service.base_url + OPENAPI_PATH,
               "--meta", "none", "--output-path", str(workdir / PACKAGE), "--config", str(config),
               "--fail-on-warning"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(workdir))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(workdir))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def model_name(name: str) -> str:
    """The generator's class name for a schema name (snake, kebab or Pascal case)."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", name))


def expected_models(document: Schema) -> dict[str, str]:
    """Model class name -> where in the document: each schema with properties that an answer can hold."""
    found: dict[str, str] = {}

    def walk(schema: Schema, name: str | None, where: str) -> None:
        if "$ref" in schema:
            component = schema["$ref"].rsplit("/", 1)[1]
            if component not in seen:
                seen.add(component)
                walk(document["components"]["schemas"][component], component, schema["$ref"])
            return
        if "properties" in schema:
            assert name is not None, f"{where}: an inline object with properties; make it a component"
            found[model_name(name)] = where
        for part in [*schema.get("anyOf", []), *schema.get("oneOf", []), *schema.get("allOf", []),
                     *schema.get("properties", {}).values(), *([schema["items"]] if "items" in schema else [])]:
            walk(part, None, where)

    seen: set[str] = set()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                for content in response.get("content", {}).values():
                    walk(content["schema"], f"{operation['operationId']}_response_{status}",
                         f"{method} {path} {status}")
    return found


def test_every_answer_schema_with_properties_became_a_model(document: Schema, client_package: ModuleType) -> None:
    models = importlib.import_module(f"{PACKAGE}.models")
    expected = expected_models(document)
    missing = {name: where for name, where in expected.items()
               if not (isinstance(getattr(models, name, None), type) and hasattr(getattr(models, name), "from_dict"))}
    assert missing == {}, "answer schemas the generator made no model of"
    assert {"DeviceJob", "GroupJob", "TagJob", "ChildJob", "Counts", "Error"} <= set(expected)


class TypedClient:
    """Calls the generated functions by operationId; every answer must parse into the type expected."""

    def __init__(self, document: Schema, client: Any) -> None:
        self.modules = {op["operationId"]: f"{PACKAGE}.api.{op['tags'][0]}.{snake(op['operationId'])}"
                        for item in document["paths"].values() for op in item.values()}
        self.client = client
        self.models = importlib.import_module(f"{PACKAGE}.models")

    def call(self, operation_id: str, expected: type | tuple[type, ...], status: int = 200, **kwargs: Any) -> Any:
        response = importlib.import_module(self.modules[operation_id]).sync_detailed(client=self.client, **kwargs)
        assert response.status_code == status, f"{operation_id}: {response.status_code} {response.content!r}"
        parsed = response.parsed
        for item in parsed if isinstance(parsed, list) else [parsed]:
            assert isinstance(item, expected), f"{operation_id} answered {type(item)}, not {expected}"
        return parsed


def snake(operation_id: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", operation_id).lower()


@pytest.fixture
def api(document: Schema, client_package: ModuleType, service: Service) -> Iterator[TypedClient]:
    client = importlib.import_module(f"{PACKAGE}.client")
    with client.AuthenticatedClient(base_url=service.base_url, token=service.api.token,
                                    raise_on_unexpected_status=True) as authenticated:
        yield TypedClient(document, authenticated)


def test_reference_flow_through_the_generated_client(api: TypedClient, service: Service, launch: Launcher) -> None:
    m = api.models
    api.call("getHealth", m.Health)
    api.call("getOpenApiDocument", m.OpenApiDocument)
    api.call("getSigningKey", m.SigningKey)

    workflow = str(api.call("createWorkflow", m.WorkflowCreated,
                            body=m.WorkflowIn(name="clock", command="date", timeout_seconds=60)).workflow_id)
    assert workflow in {str(w.workflow_id) for w in api.call("listWorkflows", m.Workflow)}
    assert api.call("getWorkflow", m.Workflow, id=workflow).command == "date"

    for device in ("gen-dev1", "gen-dev2"):
        registered = api.call("registerDevice", m.RegisteredDevice, status=201,
                              body=m.DeviceIn(device_id=device, device_group="gen-group", tags=["gen-tag"]))
        launch.agent(service, device, registered.mqtt_password)
    api.call("registerDevice", m.RegisteredDevice, status=201, body=m.DeviceIn(device_id="gen-idle"))  # no agent
    assert len(api.call("listDevices", m.Device, device_group="gen-group")) == 2
    assert api.call("getDevice", m.Device, id="gen-dev1").tags == ["gen-tag"]

    def submit(**target: str) -> str:
        body = m.JobIn(workflow_id=workflow, name="gen-job", **target)
        return str(api.call("submitJob", m.JobCreated, body=body).job_id)

    single, group, tag = submit(device_id="gen-dev1"), submit(device_group="gen-group"), submit(tag_id="gen-tag")
    by_device = wait_final(api, single, m.DeviceJob)
    assert by_device.status == m.JobStatus.SUCCEEDED and by_device.exit_code == 0
    assert re.search(r"\b20\d\d\b", by_device.result), by_device.result  # the output of `date`
    for job, kind in ((group, m.GroupJob), (tag, m.TagJob)):
        summary = wait_final(api, job, kind)
        assert isinstance(summary.result, m.Counts) and summary.result.succeeded == summary.result.total == 2
    children = api.call("listChildJobs", m.ChildJob, id=group)
    assert sorted(c.device_id for c in children) == ["gen-dev1", "gen-dev2"]
    assert api.call("getJob", m.ChildJob, id=str(children[0].job_id)).exit_code == 0
    listed = api.call("listJobs", (m.DeviceJob, m.GroupJob, m.TagJob), limit=10)
    assert {type(j) for j in listed} == {m.DeviceJob, m.GroupJob, m.TagJob}

    idle = submit(device_id="gen-idle")
    assert api.call("cancelJob", m.DeviceJob, id=idle).status == m.JobStatus.CANCELED
    assert api.call("deleteJob", m.JobDeleted, id=single).deleted is True
    assert api.call("getJob", m.Error, status=404, id=single).error
    api.call("updateDevice", m.Device, id="gen-idle", body=m.DevicePatch(enabled=False))
    api.call("renewDeviceCredentials", m.DeviceCredentials, id="gen-idle")
    api.call("deleteDevice", m.DeviceDeleted, id="gen-idle")
    api.call("deleteWorkflow", m.WorkflowDeleted, id=workflow)
    assert api.call("listAuditEntries", m.AuditEntry, limit=5)


def wait_final(api: TypedClient, job_id: str, kind: type) -> Any:
    """Poll getJob until the job is final; every answer on the way must be of kind."""
    def final() -> Any:
        job = api.call("getJob", kind, id=job_id)
        return job if JobStatus(job.status.value).is_final else None

    return wait_until(final, 60, f"job {job_id} to finish", interval=0.2)
