"""Webhooks: a signed POST when a job or child job ends, retried with backoff, kept across restarts."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web

from ota_bridge.store import Store, devices, jobs, webhooks, workflows
from ota_bridge.webhooks import Timing, WebhookSender
from tests.conftest import Launcher
from tests.support.databases import database_url
from tests.support.processes import wait_until

FAST = Timing(poll_seconds=0.05, settle_seconds=0, first_retry_seconds=0.1, max_attempts=3, request_seconds=5)


def verified(secret: str, headers: Any, body: bytes) -> bool:
    fields = dict(part.split("=", 1) for part in headers["X-Ota-Signature"].split(","))
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(fields["v1"], expected)


class Receiver:
    """An HTTP server on the test's loop answering each POST with the next of `statuses` (then 200)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses, self.got = list(statuses), []

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

    async def start(self) -> tuple[web.AppRunner, str]:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as found:
        yield found


async def until(condition: Any, what: str, timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_group_job_that_ends_is_posted_signed_retried_and_survives_a_restart(url: str) -> None:
    async def scenario() -> None:
        receiver = Receiver([500])  # the first POST fails: it is tried again
        runner, hook_url = await receiver.start()
        try:
            first = Store(url)
            _, secret = await first.call(webhooks.create_webhook, hook_url)
            await first.call(webhooks.enqueue_ended, 0)  # the cursor starts now: no history is sent
            for device in ("wh-a", "wh-b"):
                await first.call(devices.register_device, device, "wh-group", [])
            workflow = await first.call(workflows.create_workflow, "w", "true", None, False)
            job, _ = await first.call(jobs.submit_job, "j", workflow.workflow_id, "DeviceGroup", "wh-group", None)
            await first.call(jobs.cancel_job, job.job_id)
            assert await first.call(webhooks.enqueue_ended, 0) == 3  # two children and their parent
            assert await first.call(webhooks.enqueue_ended, 0) == 0  # once only
            first.close()  # a restart: the outbox is in the database

            second = Store(url)
            sender = asyncio.ensure_future(WebhookSender(second, FAST).run())
            try:
                await until(lambda: len(receiver.got) == 4, "3 deliveries, one of them twice")
                await until(lambda: second.call_sync(webhooks.list_webhooks)[0].pending == 0, "an empty outbox")
            finally:
                sender.cancel()
            second.close()
        finally:
            await runner.cleanup()
        assert all(verified(secret, headers, body) for headers, body in receiver.got)
        assert receiver.got[0][0]["X-Ota-Delivery"] in {h["X-Ota-Delivery"] for h, _ in receiver.got[1:]}
        events = {h["X-Ota-Delivery"]: json.loads(body) for h, body in receiver.got}
        children = [e for e in events.values() if e["Event"] == "childjob.ended"]
        parents = [e for e in events.values() if e["Event"] == "job.ended"]
        assert sorted(e["DeviceId"] for e in children) == ["wh-a", "wh-b"]
        assert all(e["Status"] == "CANCELED" and e["ParentJobId"] == job.job_id for e in children)
        assert len(parents) == 1 and parents[0]["JobId"] == job.job_id and parents[0]["Status"] == "CANCELED"
        assert parents[0]["Counts"] == {"CANCELED": 2, "Total": 2} and parents[0]["DeviceGroup"] == "wh-group"

    asyncio.run(scenario())


def test_two_instances_on_one_database_send_each_ending_once(url: str) -> None:
    async def scenario() -> None:
        receiver = Receiver([])
        runner, hook_url = await receiver.start()
        stores = [Store(url), Store(url)]
        first = stores[0]
        try:
            await first.call(webhooks.create_webhook, hook_url)
            await first.call(webhooks.enqueue_ended, 0)
            for n in range(5):
                await first.call(devices.register_device, f"wh-{n}", "wh-five", [])
            workflow = await first.call(workflows.create_workflow, "w", "true", None, False)
            senders = [asyncio.ensure_future(WebhookSender(db, FAST).run()) for db in stores]
            try:
                for _ in range(3):  # three group jobs, ended while both senders poll
                    job, _ = await first.call(jobs.submit_job, "j", workflow.workflow_id, "DeviceGroup", "wh-five",
                                              None)
                    await first.call(jobs.cancel_job, job.job_id)
                await until(lambda: len(receiver.got) >= 18, "3 x (5 children + 1 parent) deliveries")
                await asyncio.sleep(0.3)  # a duplicate would come within a few polls
            finally:
                for sender in senders:
                    sender.cancel()
        finally:
            for db in stores:
                db.close()
            await runner.cleanup()
        ids = [headers["X-Ota-Delivery"] for headers, _ in receiver.got]
        assert len(ids) == len(set(ids)) == 18

    asyncio.run(scenario())


def test_a_delivery_is_given_up_after_the_last_attempt_and_counted(tmp_path: Path) -> None:
    async def scenario() -> None:
        receiver = Receiver([500] * 2 * FAST.max_attempts)  # a job on one device: its child and itself
        runner, hook_url = await receiver.start()
        db = Store(f"sqlite:///{tmp_path / 'db'}")
        try:
            await db.call(webhooks.create_webhook, hook_url)
            await db.call(webhooks.enqueue_ended, 0)
            await db.call(devices.register_device, "wh-c", None, [])
            workflow = await db.call(workflows.create_workflow, "w", "true", None, False)
            job, _ = await db.call(jobs.submit_job, "j", workflow.workflow_id, "DeviceId", "wh-c", None)
            await db.call(jobs.cancel_job, job.job_id)
            sender = asyncio.ensure_future(WebhookSender(db, FAST).run())
            try:
                await until(lambda: db.call_sync(webhooks.list_webhooks)[0].failed == 2, "both given up")
            finally:
                sender.cancel()
            view = db.call_sync(webhooks.list_webhooks)[0]
            assert view.pending == 0 and view.last_error == "answered HTTP 500"
            assert len(receiver.got) == 2 * FAST.max_attempts
        finally:
            db.close()
            await runner.cleanup()

    asyncio.run(scenario())


class _Hook(BaseHTTPRequestHandler):
    got: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.got.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_the_api_registers_a_webhook_that_hears_of_a_job_an_agent_ran(launch: Launcher) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        service = launch.service()
        api = service.api
        bad = api.request("POST", "/v1/webhook", {"Url": "ftp://example.com/x"})
        assert bad.status == 400 and "Url" in bad.body["Detail"]
        created = api.request("POST", "/v1/webhook", {"Url": f"http://127.0.0.1:{server.server_port}/hook"})
        assert created.status == 201 and created.body["Secret"]
        listed = api.ok("GET", "/v1/webhook")
        assert [w["WebhookId"] for w in listed] == [created.body["WebhookId"]] and "Secret" not in listed[0]
        password = api.device("wh-agent")
        launch.agent(service, "wh-agent", password)
        job_id = api.submit(api.workflow("echo hi"), DeviceId="wh-agent")
        api.wait_job(job_id)
        wait_until(lambda: len(_Hook.got) >= 2, 30, "the webhook's two POSTs")
        events = {json.loads(body)["Event"]: (headers, json.loads(body)) for headers, body in _Hook.got}
        assert events["job.ended"][1]["JobId"] == job_id and events["job.ended"][1]["Status"] == "SUCCEEDED"
        assert events["childjob.ended"][1]["DeviceId"] == "wh-agent"
        assert events["childjob.ended"][1]["ExitCode"] == 0
        assert all(verified(created.body["Secret"], h, b) for h, b in _Hook.got)
        webhook = f"/v1/webhook/{created.body['WebhookId']}"
        assert api.request("DELETE", webhook).status == 200
        assert api.request("DELETE", webhook).status == 404
        assert created.body["Secret"] not in json.dumps(api.ok("GET", "/v1/audit"))
    finally:
        server.shutdown()
        server.server_close()
