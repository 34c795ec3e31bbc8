"""The OpenAPI 3.1 description of the REST API, served at GET /v1/openapi.json.

Request bodies come from the pydantic models (schemas.py); answers are written out here field for
field as serialize.py makes them; path and query parameters carry the patterns params.py enforces.
tests/test_openapi.py checks that every route is here and that the running service answers as
described (schemathesis). Client generators name their functions by operationId and group them
by tag, and make a model of each named schema with properties; tests/test_generated_client.py
generates a client (openapi-python-client) and runs the reference flow through it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pydantic
from aiohttp import web

from agent.protocol import ARTIFACT_NAME_PATTERN, JobStatus

from .. import __version__
from ..roles import Role, needed_role
from .artifacts import DEVICE_ARTIFACT_ROUTE
from .health import ALIVE_PATH, HEALTH_PATH, LIVE_PATH, READY_PATH
from .metrics import METRICS_PATH
from .params import BODYLESS_METHODS, PATH_ID_SHAPES, id_kind
from .schemas import MAX_BULK_DEVICES, DeviceIn, DevicePatch, DevicesIn, JobIn, WebhookIn, WorkflowIn
from .views import DEFAULT_PAGE, MAX_OFFSET, MAX_PAGE, MAX_WAIT_SECONDS

OPENAPI_PATH = "/v1/openapi.json"
Schema = dict[str, Any]

# --- building blocks ------------------------------------------------------------------------

STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
BOOLEAN: Schema = {"type": "boolean"}
TIME: Schema = {"type": "string", "format": "date-time", "description": "ISO 8601, UTC, milliseconds"}
UUID: Schema = {"type": "string", "format": "uuid"}
CONDITION: Schema = {"type": "string", "enum": ["ok", "unavailable"]}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


STATUS = ref("JobStatus")  # components, so that a generated client has one enum of each
ROLE = ref("Role")


def record(required: dict[str, Schema], optional: dict[str, Schema] | None = None, **extra: Any) -> Schema:
    """A JSON object with exactly these fields: the required ones always, the optional ones sometimes."""
    properties = {**required, **(optional or {})}
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False,
            **extra}


def deleted(id_field: str) -> Schema:
    return record({id_field: STRING, "Deleted": {"const": True}})


# --- answers, as serialize.py makes them ----------------------------------------------------

COUNTS = record({**{s.value: INTEGER for s in JobStatus}, "Total": INTEGER},
                description="child jobs per state, and their total (a group or tag job)")
JOB = {"JobId": UUID, "JobName": STRING, "WorkflowId": UUID, "Command": STRING, "TimeoutSeconds": INTEGER,
       "Status": STATUS, "CreatedTime": TIME, "StartTime": nullable(TIME), "EndTime": nullable(TIME)}
DEVICE = {"DeviceId": STRING, "DeviceGroup": nullable(STRING), "Tags": {"type": "array", "items": STRING},
          "Online": BOOLEAN, "LastSeen": nullable(TIME), "Enabled": BOOLEAN, "PendingJobs": INTEGER,
          "CreatedTime": TIME}
CREDENTIALS = {"MqttUsername": STRING, "MqttPassword": STRING}
WEBHOOK = {"WebhookId": UUID, "Url": STRING, "CreatedTime": TIME, "PendingDeliveries": INTEGER,
           "FailedDeliveries": INTEGER, "LastError": nullable(STRING)}


# What a job shows only when it was submitted with them (docs/rollouts-attempts.md).
JOB_OPTIONS = {
    "Parameters": {"type": "object", "additionalProperties": STRING,
                   "description": "the values given; Command holds them filled in, shell-quoted"},
    "Retries": ref("JobRetries"),
    "OnFailure": ref("JobOnFailure"),
}
ATTEMPT = record({"Attempt": INTEGER, "Status": STATUS, "StartTime": nullable(TIME), "EndTime": nullable(TIME),
                  "ExitCode": nullable(INTEGER), "Stdout": STRING, "Stderr": STRING, "StdoutTruncated": BOOLEAN,
                  "StderrTruncated": BOOLEAN, "Reason": nullable(STRING)},
                 description="one attempt of a child job; the last is the child's own fields")


def job_kind(name: str, target: str, result: Schema, description: str, **more: Schema) -> Schema:
    return record({**JOB, target: STRING, "Result": result, **more}, {**JOB_OPTIONS, "Rollout": ref("RolloutState")},
                  title=name, description=description)


ROLLOUT_STATE = record(
    {"Kind": nullable({"type": "string", "enum": ["Waves", "MaxPerMinute"]}),
     "Wave": nullable(INTEGER), "Waves": nullable(INTEGER), "Released": INTEGER, "Pending": INTEGER,
     "RatePerMinute": nullable({"type": "number"}), "Paused": BOOLEAN, "Aborted": BOOLEAN,
     "AbortReason": nullable(STRING), "Active": BOOLEAN, "Continuous": BOOLEAN, "CheckedAt": nullable(TIME)},
    description="a job's rollout (only a job with Rollout, AbortOn, Schedule or Continuous): Wave = waves "
                "released so far, Pending = children still held (SCHEDULED), CheckedAt = the service's clock at "
                "its last decision (docs/rollouts.md)")


def jobs() -> dict[str, Schema]:
    """A job's summary: Job is exactly one of three complete records, one per kind of target.

    Not Job's properties beside a oneOf of required targets: client generators make no model of
    that. additionalProperties: false keeps a summary from matching two kinds.
    """
    kinds = {
        "DeviceJob": job_kind("DeviceJob", "DeviceId", {"type": "string", "description": "the device's stdout"},
                              "a job for one device", ExitCode=nullable(INTEGER)),
        "GroupJob": job_kind("GroupJob", "DeviceGroup", ref("Counts"), "a job for a group, a child per device"),
        "TagJob": job_kind("TagJob", "TagId", ref("Counts"), "a job for a tag, a child per device"),
    }
    job = {"oneOf": [ref(name) for name in kinds], "title": "Job",
           "description": "a job's summary: exactly one target, and its Result by the kind of target"}
    return {**kinds, "Job": job}

ANSWERS: dict[str, Schema] = {
    "JobStatus": {"type": "string", "enum": [s.value for s in JobStatus]},
    "Role": {"type": "string", "enum": [r.value for r in Role]},
    "Error": record({"Error": STRING, "Detail": STRING}),
    "Health": record({"Status": CONDITION, "Database": ref("Component"), "Broker": ref("Component"),
                      "BrokerConnected": BOOLEAN},
                     description="200 when the database and the broker are both usable, 503 when either is not"),
    "Component": record({"Status": CONDITION, "Detail": STRING}),
    "Live": record({"Status": {"const": "ok"}}),
    "OpenApiDocument": {"type": "object", "required": ["openapi", "paths"]},
    "SigningKey": record({"Algorithm": STRING, "PublicKey": STRING}),
    "WorkflowCreated": record({"WorkflowId": UUID}),
    "Workflow": record({"WorkflowId": UUID, "Name": STRING, "Command": STRING,
                        "TimeoutSeconds": nullable(INTEGER), "SuccessOnRestart": BOOLEAN,
                        "Artifacts": {"type": "array", "items": UUID, "description": "the ArtifactIds it names"},
                        "CreatedTime": TIME}),
    "WorkflowDeleted": deleted("WorkflowId"),
    "JobCreated": record({"JobId": UUID}),
    "Counts": COUNTS,
    "RolloutState": ROLLOUT_STATE,
    **jobs(),
    "ChildJob": record(
        {"JobId": UUID, "ParentJobId": UUID, "DeviceId": STRING, "Command": STRING, "Status": STATUS,
         "StartTime": nullable(TIME), "EndTime": nullable(TIME), "ExitCode": nullable(INTEGER), "Stdout": STRING,
         "Stderr": STRING, "StdoutTruncated": BOOLEAN, "StderrTruncated": BOOLEAN, "Reason": nullable(STRING),
         "Result": STRING, "Download": nullable(ref("DownloadProgress")), "Attempt": INTEGER,
         "Attempts": {"type": "array", "items": ref("Attempt")}},
        {"OnFailureOf": UUID, "OnFailureJobId": UUID},
        description="OnFailureOf: this is the rollback child of that child job; OnFailureJobId: this child's "
                    "rollback child"),
    "Attempt": ATTEMPT,
    "JobRetries": record({"Max": INTEGER, "DelaySeconds": INTEGER, "On": {"type": "array", "items": STATUS}},
                         description="retries of a device's failed attempt (docs/rollouts-attempts.md)"),
    "JobOnFailure": record({"WorkflowId": UUID, "Command": STRING, "Result": ref("Counts")},
                           description="the rollback workflow and its child jobs per state (not in Result)"),
    "DownloadProgress": record({"Bytes": INTEGER, "TotalBytes": INTEGER},
                               description="the latest DOWNLOADING report: bytes of the job's artifacts "
                                           "fetched so far, and in all"),
    "Artifact": record({"ArtifactId": UUID, "Name": {"type": "string", "pattern": f"^{ARTIFACT_NAME_PATTERN}$"},
                        "Version": STRING, "Sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                        "Size": INTEGER, "Created": TIME}),
    "ArtifactDeleted": deleted("ArtifactId"),
    "JobDeleted": deleted("JobId"),
    "Device": record(DEVICE),
    "RegisteredDevice": record({**DEVICE, **CREDENTIALS}),
    "RegisteredDevices": record({"Devices": {"type": "array", "items": ref("RegisteredDevice")}},
                                description="every device of the request, in its order, each with its password"),
    "DeviceCredentials": record({"DeviceId": STRING, **CREDENTIALS}),
    "DeviceDeleted": deleted("DeviceId"),
    "DeviceQueue": record({"DeviceId": STRING, "Total": INTEGER, "Jobs": {"type": "array", "items": ref("QueuedJob")}},
                          description="a device's pending child jobs in the order it runs them, head first "
                                      "(the first 100), and how many are pending in all"),
    "QueuedJob": record({"JobId": UUID, "ParentJobId": UUID, "JobName": STRING, "Command": STRING,
                         "Status": STATUS, "Seq": INTEGER, "CreatedTime": TIME},
                        {"Reason": STRING}, description="Reason: only on a SCHEDULED job, why it is held"),
    "EventTicket": record({"Ticket": STRING, "ExpiresInSeconds": INTEGER},
                          description="opens GET /v1/events once, within ExpiresInSeconds"),
    "AuditEntry": record(
        {"Time": TIME, "TokenName": nullable(STRING), "Role": nullable(ROLE),
         "Remote": nullable(STRING), "Method": STRING, "Path": STRING, "TargetId": nullable(STRING),
         "Status": INTEGER, "Outcome": STRING},
        description="one state-changing request; TokenName and Role are null when no valid token came"),
    "Webhook": record(WEBHOOK),
    "RegisteredWebhook": record({**WEBHOOK, "Secret": STRING},
                                description="Secret signs every POST (X-Ota-Signature); it is shown only here"),
    "WebhookDeleted": deleted("WebhookId"),
}

GET_JOB = {"anyOf": [ref("Job"), ref("ChildJob")], "description": "a child job's id answers that child"}


# --- operations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    name: str  # the operationId: a generated client's function name
    summary: str
    answer: Schema
    status: int = 200
    body: type[pydantic.BaseModel] | None = None
    query: tuple[Schema, ...] = ()
    also: tuple[int, ...] = ()  # statuses beyond those the shape of the operation implies
    public: bool = False
    headers: Schema | None = None
    media: str = "application/json"  # the success answer's content type
    upload: Schema | None = None  # a request body that is not one JSON model: {content type: schema}
    unavailable: Schema | None = None  # a health check's answer with 503, instead of an Error


def listing(name: str) -> Schema:
    return {"type": "array", "items": ref(name)}


def query_param(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def page(items: str) -> tuple[Schema, ...]:
    return (query_param("Limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE},
                        f"{items} per page"),
            query_param("Offset", {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0},
                        f"{items} to skip, newest first"))


def total(items: str) -> Schema:
    return {"X-Total-Count": {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "description": f"{items} in all"}}


DEVICE_FILTERS = (query_param("DeviceGroup", STRING, "only devices of this group"),
                  query_param("TagId", STRING, "only devices with this tag"))
RETRY_AFTER = {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "required": True,
                               "description": "seconds to wait before trying again"}}

WAIT_PARAM = query_param("WaitSeconds", {"type": "integer", "minimum": 0, "maximum": MAX_WAIT_SECONDS, "default": 0},
                         "if the job is not final, answer once it is, or after this many seconds (its Status "
                         "says which); the answer is what a GET without it gives at that moment")
TICKET_PARAM = {"name": "Ticket", "in": "query", "required": True, "schema": STRING,
                "description": "from POST /v1/events/ticket; this operation takes no Authorization header"}
BINARY: Schema = {"type": "string", "format": "binary"}
OCTETS = "application/octet-stream"
SHA256: Schema = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
UPLOAD_SUMMARY = ("Upload an artifact, streamed to disk: multipart/form-data with the parts Name, Version and File "
                  "(curl -F Name=fw.bin -F Version=1.2 -F File=@fw.bin), or the raw bytes as "
                  "application/octet-stream with Name and Version in the query")
UPLOAD_FIELDS = (query_param("Name", {"type": "string", "pattern": f"^{ARTIFACT_NAME_PATTERN}$"},
                             "the file's name on the device (or a multipart part)"),
                 query_param("Version", STRING, "any version text, up to 100 characters (or a multipart part)"))
UPLOAD: Schema = {
    "multipart/form-data": {"type": "object", "required": ["Name", "Version", "File"], "properties": {
        "Name": {"type": "string", "pattern": f"^{ARTIFACT_NAME_PATTERN}$"}, "Version": STRING, "File": BINARY}},
    OCTETS: BINARY,
}
DEVICE_LINK = tuple({"name": name, "in": "query", "required": True, "schema": STRING, "description": meaning}
                    for name, meaning in (("device", "the DeviceId the link was made for"),
                                          ("job", "the child job's JobId"),
                                          ("token", "the link's token (docs/security.md#artifacts)")))
DEVICE_FETCH_SUMMARY = ("A device fetches an artifact of its pending job with the link in the job's signed head "
                        "(no API token): ETag its SHA-256, a single Range honoured (206, 416)")
EVENTS_SUMMARY = ("Server-sent events while open: `job` {JobId} for a new job, `child` {JobId, ParentJobId, "
                  "DeviceId, Status} for a child job that changed, `device` {DeviceId, Online, LastSeen}, "
                  "`resync` {} when too much changed at once to send row by row")

OPERATIONS: dict[tuple[str, str], Op] = {
    ("get", HEALTH_PATH): Op("getHealth", "The database and the broker, each usable or not", ref("Health"),
                             public=True, unavailable=ref("Health")),
    ("get", READY_PATH): Op("getReadiness", "The same as /v1/health, for readiness probes", ref("Health"),
                            public=True, unavailable=ref("Health")),
    ("get", LIVE_PATH): Op("getLiveness", "The process serves HTTP (outages of the database or broker do not count)",
                           ref("Live"), public=True),
    ("get", ALIVE_PATH): Op("getAlive", "The same as /livez: the process serves HTTP", ref("Live"), public=True),
    ("get", METRICS_PATH): Op("getMetrics", "Prometheus metrics in the text format (docs/operations.md#monitoring)",
                              {"type": "string"}, media="text/plain"),
    ("get", OPENAPI_PATH): Op("getOpenApiDocument", "This document", ref("OpenApiDocument"), public=True),
    ("get", "/v1/signing-key"): Op("getSigningKey", "The public key agents verify jobs with", ref("SigningKey")),
    ("post", "/v1/workflow"): Op("createWorkflow", "Define a workflow", ref("WorkflowCreated"), body=WorkflowIn),
    ("get", "/v1/workflow"): Op("listWorkflows", "Every workflow", listing("Workflow")),
    ("get", "/v1/workflow/{id}"): Op("getWorkflow", "One workflow", ref("Workflow")),
    ("delete", "/v1/workflow/{id}"): Op("deleteWorkflow", "Delete a workflow; its jobs keep their records",
                                        ref("WorkflowDeleted")),
    ("post", "/v1/job"): Op("submitJob", "Submit a job to one device, a group or a tag", ref("JobCreated"),
                            body=JobIn, also=(404,)),
    ("get", "/v1/job"): Op("listJobs", "Jobs, newest first", listing("Job"), query=page("jobs"),
                           headers=total("jobs")),
    ("get", "/v1/job/{id}"): Op("getJob", "One job's summary, or one child job", GET_JOB, query=(WAIT_PARAM,)),
    ("get", "/v1/job/{id}/childjobs"): Op("listChildJobs", "A job's child jobs, one per device",
                                          listing("ChildJob")),
    ("post", "/v1/job/{id}/pause"): Op("pauseJob", "Stop the job's rollout releasing devices; released ones go on",
                                       ref("Job"), also=(409,)),
    ("post", "/v1/job/{id}/resume"): Op("resumeJob", "Let the job's rollout release devices again", ref("Job"),
                                        also=(409,)),
    ("post", "/v1/job/{id}/cancel"): Op("cancelJob", "Cancel the children not yet final; keeps the record",
                                        ref("Job")),
    ("delete", "/v1/job/{id}"): Op("deleteJob", "Delete a job; queued children leave their queues",
                                   ref("JobDeleted")),
    ("post", "/v1/device"): Op("registerDevice", "Register a device; answers its MQTT password once",
                               ref("RegisteredDevice"), status=201, body=DeviceIn, also=(409,)),
    ("post", "/v1/devices"): Op("registerDevices",
                                f"Register up to {MAX_BULK_DEVICES} devices, all or none; answers each password once",
                                ref("RegisteredDevices"), status=201, body=DevicesIn, also=(409,)),
    ("get", "/v1/device"): Op("listDevices", "Devices, by group or tag", listing("Device"), query=DEVICE_FILTERS),
    ("get", "/v1/device/{id}"): Op("getDevice", "One device", ref("Device")),
    ("patch", "/v1/device/{id}"): Op("updateDevice", "Change a device's group, tags or Enabled", ref("Device"),
                                     body=DevicePatch),
    ("post", "/v1/device/{id}/credentials"): Op("renewDeviceCredentials",
                                                "A new MQTT password, shown once; the old one stops working",
                                                ref("DeviceCredentials")),
    ("delete", "/v1/device/{id}"): Op("deleteDevice", "Forget a device; its queued jobs are canceled",
                                      ref("DeviceDeleted")),
    ("get", "/v1/device/{id}/queue"): Op("getDeviceQueue", "A device's pending jobs, in the order it runs them",
                                         ref("DeviceQueue")),
    ("post", "/v1/events/ticket"): Op("createEventTicket", "A one-use ticket for the event stream, valid 30 s",
                                      ref("EventTicket")),
    ("get", "/v1/events"): Op("streamEvents", EVENTS_SUMMARY, {"type": "string"}, media="text/event-stream",
                              query=(TICKET_PARAM,)),
    ("get", "/v1/audit"): Op("listAuditEntries", "The audit log of state-changing requests, newest first (admin)",
                             listing("AuditEntry"), query=page("entries"), headers=total("entries")),
    ("post", "/v1/webhook"): Op("createWebhook", "Register a URL told of every job that ends; answers its secret once",
                                ref("RegisteredWebhook"), status=201, body=WebhookIn),
    ("get", "/v1/webhook"): Op("listWebhooks", "The registered webhooks and their undelivered POSTs",
                               listing("Webhook")),
    ("delete", "/v1/webhook/{id}"): Op("deleteWebhook", "Forget a webhook and its undelivered POSTs",
                                       ref("WebhookDeleted")),
    ("post", "/v1/artifact"): Op("uploadArtifact", UPLOAD_SUMMARY, ref("Artifact"), status=201, upload=UPLOAD,
                                 query=UPLOAD_FIELDS, also=(413, 507)),
    ("get", "/v1/artifact"): Op("listArtifacts", "Artifacts, newest first", listing("Artifact"),
                                query=page("artifacts"), headers=total("artifacts")),
    ("get", "/v1/artifact/{id}"): Op("getArtifact", "One artifact's record", ref("Artifact")),
    ("get", "/v1/artifact/{id}/content"): Op("getArtifactContent", "The artifact's bytes (ETag: its SHA-256; "
                                             "a Range header is honoured)", BINARY, media=OCTETS),
    ("delete", "/v1/artifact/{id}"): Op("deleteArtifact", "Delete an artifact; refused while a pending job needs it",
                                        ref("ArtifactDeleted"), also=(409,)),
    ("get", DEVICE_ARTIFACT_ROUTE): Op("fetchDeviceArtifact", DEVICE_FETCH_SUMMARY, BINARY, media=OCTETS,
                                       query=DEVICE_LINK, public=True, also=(403, 404, 503)),
}

# Each operation's tag, by the first part of its path after /v1/; a generated client groups its functions so.
TAGS = {"workflow": "workflows", "job": "jobs", "device": "devices", "devices": "devices", "audit": "audit",
        "artifact": "artifacts", "device-artifact": "artifacts", "webhook": "webhooks", "health": "service",
        "openapi.json": "service", "signing-key": "service",
        "readyz": "service", "livez": "service", "healthz": "service", "metrics": "service", "events": "events"}
TAG_MEANINGS = {
    "workflows": "Named commands that jobs run",
    "jobs": "Runs of a workflow on one device, a group or a tag; a group or tag job has a child job per device",
    "devices": "Registered devices, their groups, tags and MQTT credentials",
    "audit": "The log of state-changing requests",
    "webhooks": "URLs that receive a signed POST when a job or child job ends",
    "artifacts": "Files that jobs deliver: uploaded once, fetched by each device with a link in its signed job",
    "events": "Live changes, as server-sent events (the web console's)",
    "service": "Health, metrics, this document and the key agents verify jobs with",
}


def tag(path: str) -> str:
    """The tag of path; a path under a new first part needs an entry in TAGS."""
    parts = path.strip("/").split("/")
    return TAGS[parts[1] if parts[0] == "v1" else parts[0]]

ERROR_MEANINGS = {
    400: "bad input: the detail names the field, parameter or place in the JSON",
    401: "no API token, or not a valid one",
    403: "the token's role may not do this; the detail names the role needed (docs/security.md#roles); for a "
         "device's artifact link: it does not verify, or its job is not pending or does not name the file",
    404: "no such id (or an id of the wrong shape, which the detail says)",
    409: "the device is already registered (a bulk registration names every one, and registers none), or the "
         "artifact is needed by pending jobs (the detail names them)",
    413: "the body is over 1 MiB; an artifact, over --max-artifact-size (the detail names the limit)",
    507: "the artifact directory refused the upload's bytes (full, read-only); nothing was stored",
    503: "the database is unavailable; the request changed nothing unless the detail says it may have been saved",
}


def error_statuses(method: str, path: str, op: Op) -> list[int]:
    """Every error status the operation can answer, from its shape and its own extras."""
    statuses = set(op.also)
    if op.body is not None or op.query or method.upper() in BODYLESS_METHODS:
        statuses.add(400)  # a bad body or parameter, or a body where none is taken
    if op.body is not None:
        statuses.add(413)
    if "{id}" in path:
        statuses.add(404)
    if not op.public:
        statuses |= {401, 503}  # checking the token asks the database
    if not op.public and needed_role(method.upper(), path) is not Role.VIEWER:
        statuses.add(403)
    return sorted(statuses)


def operation(method: str, path: str, op: Op) -> Schema:
    answer: Schema = {"description": op.summary, "content": {op.media: {"schema": op.answer}}}
    if op.headers:
        answer["headers"] = op.headers
    responses = {str(op.status): answer}
    for status in error_statuses(method, path, op):
        responses[str(status)] = {"description": ERROR_MEANINGS[status],
                                  "content": {"application/json": {"schema": ref("Error")}}}
        if status == 503:
            responses["503"]["headers"] = RETRY_AFTER
    if op.unavailable is not None:
        responses["503"] = {"description": "the database or the broker is unusable; the body says which",
                            "content": {"application/json": {"schema": op.unavailable}}}
    result: Schema = {"summary": op.summary, "operationId": op.name, "tags": [tag(path)], "responses": responses,
                      "parameters": [*path_params(path), *op.query]}
    if op.body is not None:
        result["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(op.body.__name__)}}}
    if op.upload is not None:
        result["requestBody"] = {"required": True, "content": {kind: {"schema": s} for kind, s in op.upload.items()}}
    if op.public:
        result["security"] = []
    else:
        result["x-role"] = needed_role(method.upper(), path).value
    return result


def path_params(path: str) -> list[Schema]:
    if "{sha256}" in path:
        return [{"name": "sha256", "in": "path", "required": True, "schema": SHA256,
                 "description": "the file's SHA-256, as the job's head names it"}]
    kind = id_kind(path)
    if kind is None:
        return []
    pattern, shape = PATH_ID_SHAPES[kind]
    return [{"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": pattern},
             "description": f"{kind} ids are {shape}"}]


def request_schemas() -> dict[str, Schema]:
    found: dict[str, Schema] = {}
    for op in OPERATIONS.values():
        if op.body is not None:
            schema = op.body.model_json_schema(ref_template="#/components/schemas/{model}")
            found.update(schema.pop("$defs", {}))
            found[op.body.__name__] = schema
    return found


@functools.cache
def document() -> Schema:
    paths: dict[str, Schema] = {}
    for (method, path), op in OPERATIONS.items():
        paths.setdefault(path, {})[method] = operation(method, path, op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "ota-bridge", "version": __version__,
                 "description": "Jobs and OTA updates for fleets of Linux IoT devices; SocketXP-compatible."},
        "tags": [{"name": name, "description": meaning} for name, meaning in TAG_MEANINGS.items()],
        "paths": paths,
        "components": {"schemas": {**ANSWERS, **request_schemas()},
                       "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearerAuth": []}],
    }


async def serve_openapi(request: web.Request) -> web.Response:
    return web.json_response(document())
