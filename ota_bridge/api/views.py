"""The REST handlers. Each reads its input, asks the store, tells the dispatcher, answers JSON."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from agent.protocol import FINAL_STATUSES, SIGNATURE_ALGORITHM

from .. import parameters
from ..broker_accounts import BrokerAccounts
from ..dispatch import Dispatcher
from ..errors import JobNotFound
from ..signing import JobSigner
from ..store import Store, devices, jobs, rollouts, workflows
from . import params, serialize
from .body import read_model
from .schemas import DeviceIn, DevicePatch, DevicesIn, JobIn, WorkflowIn

STORE = web.AppKey("store", Store)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
SIGNER = web.AppKey("signer", JobSigner)
ACCOUNTS = web.AppKey("accounts", BrokerAccounts)
DEFAULT_PAGE, MAX_PAGE, MAX_OFFSET = 100, 1000, 2**31
MAX_WAIT_SECONDS = 60  # GET /v1/job/{id}?WaitSeconds=: the longest a request is held
WAIT_RECHECK_SECONDS = 0.5  # a held GET reads the job again at least this often
FINAL_VALUES = frozenset(status.value for status in FINAL_STATUSES)
HASHING_THREADS = os.cpu_count() or 2
_HASHING = ThreadPoolExecutor(HASHING_THREADS, thread_name_prefix="ota-hash")  # device passwords' PBKDF2

routes = web.RouteTableDef()


class HeldGets:
    """GET /v1/job/{id}?WaitSeconds= requests: answered at once, as they are, when the service stops
    (else each would hold the shutdown for up to MAX_WAIT_SECONDS)."""

    def __init__(self) -> None:
        self.stopping = False

    async def release(self, app: web.Application) -> None:
        self.stopping = True
        app[STORE].release_ending_waiters()


HELD = web.AppKey("held_gets", HeldGets)


def add_held_gets(app: web.Application) -> None:
    app[HELD] = HeldGets()
    app.on_shutdown.append(app[HELD].release)


def _store(request: web.Request) -> Store:
    return request.app[STORE]


def page(request: web.Request) -> tuple[int, int]:
    """(Limit, Offset) of a listing that pages, checked; no other query parameter is taken."""
    query = params.query(request, ("Limit", "Offset"))
    return (params.whole_number(query, "Limit", DEFAULT_PAGE, 1, MAX_PAGE),
            params.whole_number(query, "Offset", 0, 0, MAX_OFFSET))


# --- workflows ------------------------------------------------------------------------------


@routes.post("/v1/workflow")
async def create_workflow(request: web.Request) -> web.Response:
    body = await read_model(request, WorkflowIn)
    parameters.check_syntax(body.Command)
    w = await _store(request).call(workflows.create_workflow, body.Name, body.Command, body.TimeoutSeconds,
                                   body.SuccessOnRestart, tuple(body.Artifacts))
    return web.json_response({"WorkflowId": w.workflow_id}, status=200)


@routes.get("/v1/workflow")
async def list_workflows(request: web.Request) -> web.Response:
    return web.json_response([serialize.workflow(w) for w in await _store(request).read(workflows.view_workflows)])


@routes.get("/v1/workflow/{id}")
async def get_workflow(request: web.Request) -> web.Response:
    w = await _store(request).read(workflows.view_workflow, request.match_info["id"])
    return web.json_response(serialize.workflow(w))


@routes.delete("/v1/workflow/{id}")
async def delete_workflow(request: web.Request) -> web.Response:
    workflow_id = request.match_info["id"]
    await _store(request).call(workflows.delete_workflow, workflow_id)
    return web.json_response({"WorkflowId": workflow_id, "Deleted": True})


# --- jobs -----------------------------------------------------------------------------------


# Registered before the other /v1/job routes: aiohttp tries the resources under /v1/job in the order they
# were added, and this GET is the one most often called (a poll); first, it is matched at the first try.
@routes.get("/v1/job/{id}")
async def get_job(request: web.Request) -> web.Response:
    """The job (or child job) as it is; with WaitSeconds, once it is final or that many seconds passed.

    A waiting request reads the job again after each write this process commits that may make a job
    final (not after a batch of progress reports), and at least every WAIT_RECHECK_SECONDS (a write
    of another instance is not heard of), so it answers as soon as a read can see the job final; the
    answer is the one a plain GET gives at that moment. When the service stops, it answers at once."""
    job_id = request.match_info["id"]
    wait = params.whole_number(params.query(request, ("WaitSeconds",)), "WaitSeconds", 0, 0, MAX_WAIT_SECONDS)
    store, held = _store(request), request.app[HELD]
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        seen = store.endings
        shown = await _shown_job(store, job_id)
        left = deadline - asyncio.get_running_loop().time()
        if shown["Status"] in FINAL_VALUES or left <= 0 or held.stopping:
            return web.json_response(shown)
        await store.ended_since(job_id, seen, min(left, WAIT_RECHECK_SECONDS))


async def _shown_job(store: Store, job_id: str) -> dict[str, Any]:
    """The job's answer: a single-device job's from its one row, another's from its summary; a child job's."""
    try:
        shown = await store.read(jobs.shown_job, job_id)
    except JobNotFound:
        return serialize.child(await store.read(jobs.child_shown, job_id))
    return serialize.job_row(shown) if isinstance(shown, jobs.JobRow) else serialize.job(shown)


@routes.post("/v1/job")
async def submit_job(request: web.Request) -> web.Response:
    body = await read_model(request, JobIn)
    field, value = body.target
    plan = body.plan()
    dispatcher = request.app[DISPATCHER]
    if plan is None:  # the queues of a small target read in the submission (dispatcher.read_window)
        job, device_ids, read = await _store(request).call(
            jobs.submit_job_with_queues, body.Name, body.WorkflowId, field, value, body.TimeoutSeconds,
            dispatcher.read_window, options=body.options)
    else:
        submitted = await _store(request).call(rollouts.submit_with_queues, body.Name, body.WorkflowId, field,
                                               value, body.TimeoutSeconds, plan, body.options)
        job, device_ids, read = submitted.job, submitted.device_ids, submitted.queues
    known = {q.device_id for q in read}
    dispatcher.mark(d for d in device_ids if d not in known)
    dispatcher.mark_read(read)
    return web.json_response({"JobId": job.job_id})


@routes.get("/v1/job")
async def list_jobs(request: web.Request) -> web.Response:
    summaries, total = await _store(request).read(jobs.list_jobs, *page(request))
    headers = {"X-Total-Count": str(total)}
    return web.json_response([serialize.job(s) for s in summaries], headers=headers)


@routes.get("/v1/job/{id}/childjobs")
async def child_jobs(request: web.Request) -> web.Response:
    children = await _store(request).read(jobs.child_jobs_shown, request.match_info["id"])
    return web.json_response([serialize.child(c) for c in children])


@routes.delete("/v1/job/{id}")
async def delete_job(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    device_ids = await _store(request).call(jobs.delete_job, job_id)
    request.app[DISPATCHER].mark(device_ids)
    return web.json_response({"JobId": job_id, "Deleted": True})


@routes.post("/v1/job/{id}/pause")
async def pause_job(request: web.Request) -> web.Response:
    """Stop the job's rollout releasing devices; those released already go on."""
    return await _pause(request, True)


@routes.post("/v1/job/{id}/resume")
async def resume_job(request: web.Request) -> web.Response:
    return await _pause(request, False)


async def _pause(request: web.Request, paused: bool) -> web.Response:
    job_id = request.match_info["id"]
    request.app[DISPATCHER].mark(await _store(request).call(rollouts.set_paused, job_id, paused))
    return web.json_response(serialize.job(await _store(request).read(jobs.get_job, job_id)))


@routes.post("/v1/job/{id}/cancel")
async def cancel_job(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    device_ids = await _store(request).call(jobs.cancel_job, job_id)
    request.app[DISPATCHER].mark(device_ids)
    return web.json_response(serialize.job(await _store(request).read(jobs.get_job, job_id)))


# --- devices --------------------------------------------------------------------------------


@routes.get("/v1/signing-key")
async def signing_key(request: web.Request) -> web.Response:
    """The public key agents verify jobs with (give it to ota-agent --server-key)."""
    return web.json_response({"Algorithm": SIGNATURE_ALGORITHM, "PublicKey": request.app[SIGNER].public_key_b64})


@routes.post("/v1/device")
async def register_device(request: web.Request) -> web.Response:
    body = await read_model(request, DeviceIn)
    [answer] = await _register(request, [body])
    return web.json_response(answer, status=201)


@routes.post("/v1/devices")
async def register_devices(request: web.Request) -> web.Response:
    """Up to MAX_BULK_DEVICES devices, all or none, each password answered once."""
    body = await read_model(request, DevicesIn)
    return web.json_response({"Devices": await _register(request, list(body.Devices))}, status=201)


async def _register(request: web.Request, wanted: list[DeviceIn]) -> list[dict[str, object]]:
    """Hash off the event loop and the store's thread, store in one transaction, then the broker's accounts."""
    pairs = await _new_credentials(len(wanted))
    new = [devices.NewDevice(d.DeviceId, d.DeviceGroup, tuple(d.Tags), hashed)
           for d, (_, hashed) in zip(wanted, pairs, strict=True)]
    views = await _store(request).call(rollouts.register_devices, new)
    accounts = [(d.DeviceId, password) for d, (password, _) in zip(wanted, pairs, strict=True)]
    await request.app[ACCOUNTS].registered(accounts)
    # No head yet: a new device is given its first (signed, idle) head when it first comes online
    # (Dispatcher._handle, first_seen), so registering a fleet costs hashing and inserting, not the
    # signing and publishing of a head for every device that may not connect for days.
    return [{**serialize.device(view), "MqttUsername": device_id, "MqttPassword": password}
            for view, (device_id, password) in zip(views, accounts, strict=True)]


async def _new_credentials(count: int) -> list[tuple[str, str]]:
    """(password, hash) pairs, made in parallel on the hashing threads (PBKDF2 releases the GIL)."""
    loop = asyncio.get_running_loop()
    share = -(-count // HASHING_THREADS)
    parts = await asyncio.gather(*(loop.run_in_executor(_HASHING, devices.new_credentials, min(share, count - start))
                                   for start in range(0, count, share)))
    return [pair for part in parts for pair in part]


@routes.get("/v1/device")
async def list_devices(request: web.Request) -> web.Response:
    query = params.query(request, ("DeviceGroup", "TagId"))
    views = await _store(request).read(devices.list_devices, query.get("DeviceGroup"), query.get("TagId"))
    return web.json_response([serialize.device(v) for v in views])


@routes.get("/v1/device/{id}")
async def get_device(request: web.Request) -> web.Response:
    return web.json_response(serialize.device(await _store(request).read(devices.get_device, request.match_info["id"])))


@routes.patch("/v1/device/{id}")
async def update_device(request: web.Request) -> web.Response:
    body = await read_model(request, DevicePatch)
    unset = object()
    group = body.DeviceGroup if "DeviceGroup" in body.model_fields_set else unset
    device_id = request.match_info["id"]
    view, joined = await _store(request).call(rollouts.update_device, device_id, group, body.Tags, body.Enabled,
                                              unset)
    request.app[DISPATCHER].mark(joined)  # a continuous job's new child
    if body.Enabled is not None:
        await request.app[ACCOUNTS].enabled(device_id, body.Enabled)
    return web.json_response(serialize.device(view))


@routes.post("/v1/device/{id}/credentials")
async def rotate_credentials(request: web.Request) -> web.Response:
    """A new MQTT password, shown once; the old one stops working and the device is disconnected."""
    device_id = request.match_info["id"]
    [(password, hashed)] = await _new_credentials(1)
    await _store(request).call(devices.set_password_hash, device_id, hashed)
    await request.app[ACCOUNTS].rotated(device_id, password, hashed)
    return web.json_response({"DeviceId": device_id, "MqttUsername": device_id, "MqttPassword": password})


@routes.delete("/v1/device/{id}")
async def delete_device(request: web.Request) -> web.Response:
    device_id = request.match_info["id"]
    await _store(request).call(devices.delete_device, device_id)
    request.app[DISPATCHER].forget(device_id)
    await request.app[ACCOUNTS].deleted(device_id)
    return web.json_response({"DeviceId": device_id, "Deleted": True})
