"""Artifacts over HTTP: uploads streamed to disk, the records, and the files devices fetch.

POST /v1/artifact takes multipart/form-data (Name, Version and File parts, in any order) or a raw
body (application/octet-stream, Name and Version in the query). GET /v1/device-artifact/{sha256}
takes no API token: its link, made for one device and one of its jobs (artifact_links.py), is
the credential, and it answers only while that job is pending and names the file. Files go out
with aiohttp's FileResponse (sendfile, a single Range, 416), ETag the SHA-256. No token is logged.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from agent.protocol import ARTIFACT_NAME_PATTERN, format_time

from ..artifact_files import SHA256_RE, ArtifactFiles, Received
from ..artifact_links import DEVICE_ARTIFACT_PATH, ArtifactLinks
from ..errors import ArtifactTooLarge, DownloadRefused, InvalidRequest, NotFound
from ..models import Artifact
from ..store import artifacts
from . import params
from .views import STORE, page

ARTIFACT_FILES = web.AppKey("artifact_files", ArtifactFiles)
ARTIFACT_LINKS = web.AppKey("artifact_links", ArtifactLinks)
DEVICE_ARTIFACT_ROUTE = DEVICE_ARTIFACT_PATH + "/{sha256}"
CHUNK_BYTES = 256 * 1024
MAX_FIELD_BYTES = 1024  # a Name or Version part
MAX_VERSION_CHARS = 100
UPLOAD_FIELDS = ("Name", "Version")
_NAME_RE = re.compile(ARTIFACT_NAME_PATTERN)
_VERSION_RE = re.compile(r"[^\x00-\x1f\x7f]{1,%d}" % MAX_VERSION_CHARS)
NAME_RULE = (f"it becomes the file's name on the device, so it must match {ARTIFACT_NAME_PATTERN} (letters, "
             f"digits, '.', '_', '+' and '-', at most 200, starting with a letter or digit)")

routes = web.RouteTableDef()


def serialize(a: Artifact) -> dict[str, Any]:
    return {"ArtifactId": a.artifact_id, "Name": a.name, "Version": a.version, "Sha256": a.sha256, "Size": a.size,
            "Created": format_time(a.created)}


# --- upload ---------------------------------------------------------------------------------


@routes.post("/v1/artifact")
async def upload_artifact(request: web.Request) -> web.Response:
    files = request.app[ARTIFACT_FILES]
    if request.content_type == "multipart/form-data":
        fields, received = await _receive_multipart(request, files)
    elif request.content_type == "application/octet-stream":
        fields = params.query(request, UPLOAD_FIELDS)
        _check_fields(fields, complete=True)
        if request.content_length is not None and request.content_length > files.max_size:
            raise ArtifactTooLarge(files.max_size)
        received = await files.receive(request.content.iter_chunked(CHUNK_BYTES))
    else:
        raise InvalidRequest(f"send the file as multipart/form-data (curl -F Name=fw -F Version=1.2 -F File=@fw.bin) "
                             f"or as application/octet-stream with ?Name=...&Version=..., not {request.content_type!r}")
    try:
        _check_fields(fields, complete=True)
        artifact = await request.app[STORE].call(artifacts.add_artifact, fields["Name"], fields["Version"],
                                                 received.sha256, received.size, partial(files.keep, received))
    except BaseException:
        files.discard(received)
        raise
    return web.json_response(serialize(artifact), status=201)


async def _receive_multipart(request: web.Request, files: ArtifactFiles) -> tuple[dict[str, str], Received]:
    fields = params.query(request, UPLOAD_FIELDS)  # parts, or the query as with a raw body; not both
    received: Received | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            name = getattr(part, "name", None)
            if not isinstance(part, BodyPartReader) or name not in (*UPLOAD_FIELDS, "File"):
                raise InvalidRequest(f"unknown part {str(name)[:40]!r}; the upload takes the parts Name, Version "
                                     f"and File")
            if name in fields or (name == "File" and received is not None):
                raise InvalidRequest(f"{name} is given more than once (as parts, or as a part and in the query)")
            if name == "File":
                received = await files.receive(_chunks(part))
            else:
                fields[name] = await _text(part, name)
                _check_fields(fields, complete=False)
    except (ValueError, HttpProcessingError) as e:  # aiohttp's words for a malformed multipart body
        _discard(files, received)
        raise InvalidRequest(f"the multipart body is malformed: {e}") from e
    except BaseException:
        _discard(files, received)
        raise
    if received is None:
        raise InvalidRequest("the upload has no File part: curl -F Name=fw -F Version=1.2 -F File=@fw.bin")
    return fields, received


def _discard(files: ArtifactFiles, received: Received | None) -> None:
    if received is not None:
        files.discard(received)


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK_BYTES):
        yield chunk


async def _text(part: BodyPartReader, name: str) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(MAX_FIELD_BYTES):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"the part {name} is over {MAX_FIELD_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"the part {name} is not UTF-8 text") from e


def _check_fields(fields: dict[str, str], complete: bool) -> None:
    """400 naming a bad Name or Version; with complete, a missing one too."""
    for field in UPLOAD_FIELDS:
        if field not in fields and complete:
            raise InvalidRequest(f"missing field {field!r}: give the artifact a Name and a Version")
    name, version = fields.get("Name"), fields.get("Version")
    if name is not None and not _NAME_RE.fullmatch(name):
        raise InvalidRequest(f"Name {name[:80]!r} is not a valid artifact name: {NAME_RULE}")
    if version is not None and (not _VERSION_RE.fullmatch(version) or not version.strip()):
        raise InvalidRequest(f"Version must be 1 to {MAX_VERSION_CHARS} characters without control characters")


# --- records --------------------------------------------------------------------------------


@routes.get("/v1/artifact")
async def list_artifacts(request: web.Request) -> web.Response:
    found, total = await request.app[STORE].read(artifacts.list_artifacts, *page(request))
    return web.json_response([serialize(a) for a in found], headers={"X-Total-Count": str(total)})


@routes.get("/v1/artifact/{id}")
async def get_artifact(request: web.Request) -> web.Response:
    return web.json_response(serialize(await request.app[STORE].read(artifacts.get_artifact, request.match_info["id"])))


@routes.get("/v1/artifact/{id}/content")
async def artifact_content(request: web.Request) -> web.StreamResponse:
    artifact = await request.app[STORE].read(artifacts.get_artifact, request.match_info["id"])
    path = _file(request, artifact.sha256)
    return ArtifactFileResponse(path, artifact.sha256,
                                {"Content-Disposition": f'attachment; filename="{artifact.name}"'})


@routes.delete("/v1/artifact/{id}")
async def delete_artifact(request: web.Request) -> web.Response:
    artifact_id = request.match_info["id"]
    await request.app[STORE].call(artifacts.delete_artifact, artifact_id, request.app[ARTIFACT_FILES].remove)
    return web.json_response({"ArtifactId": artifact_id, "Deleted": True})


# --- devices --------------------------------------------------------------------------------


@routes.get(DEVICE_ARTIFACT_ROUTE)
async def device_artifact(request: web.Request) -> web.StreamResponse:
    """The file, for the device and job its link names, while that job is pending and names it."""
    sha256 = request.match_info["sha256"]
    if not SHA256_RE.fullmatch(sha256):
        raise NotFound("artifact file", sha256[:80])
    query = params.query(request, ("device", "job", "token"))
    device_id, job_id = query.get("device", ""), query.get("job", "")
    if not request.app[ARTIFACT_LINKS].verify(device_id, job_id, sha256, query.get("token", "")):
        raise DownloadRefused("the link's token does not verify: fetch the Url of the job's head exactly as it came")
    if not await request.app[STORE].read(artifacts.device_may_fetch, device_id, job_id, sha256):
        raise DownloadRefused(f"job {job_id!r} of device {device_id!r} is not pending, or does not need this file")
    return ArtifactFileResponse(_file(request, sha256), sha256)


def _file(request: web.Request, sha256: str) -> Path:
    path = request.app[ARTIFACT_FILES].path(sha256)
    if not path.is_file():
        raise NotFound("artifact file", sha256)
    return path


class ArtifactFileResponse(web.FileResponse):
    """aiohttp's FileResponse (sendfile, Range, 416, Content-Length) whose ETag is the file's SHA-256."""

    def __init__(self, path: Path, sha256: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(path, headers=headers)
        self._sha256 = sha256

    @property
    def etag(self) -> Any:
        return web.StreamResponse.etag.fget(self)  # type: ignore[attr-defined]

    @etag.setter
    def etag(self, value: Any) -> None:  # FileResponse sets one made of the file's mtime and size: not that
        web.StreamResponse.etag.fset(self, self._sha256)  # type: ignore[attr-defined]
