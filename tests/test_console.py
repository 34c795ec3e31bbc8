"""The web console, in a real browser: headless Chromium (Debian's package) driven by Playwright,
against a real service with two real agents. A job is submitted through the forms, partly by
keyboard, and its results appear without a reload, fed by the event stream.

Also the event stream's tickets (one use, never the token in a URL) and the page's headers, over
plain HTTP. Under CI=true the browser test never skips; elsewhere it skips without chromium.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from ota_bridge.api.events import OVERLAP, PRESENCE_EVERY, Cursor, Tickets, _mac, read_changes
from ota_bridge.errors import Unauthorized
from ota_bridge.models import now
from ota_bridge.roles import Role
from ota_bridge.store import Store, changes, devices, jobs, workflows
from ota_bridge.store.tokens import TokenIdentity
from tests.conftest import Launcher
from tests.support.databases import database_url
from tests.support.processes import Service

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SHOTS = os.environ.get("OTA_CONSOLE_SCREENSHOTS")  # a directory to keep each page's screenshot in


def open_stream(service: Service, query: str, token: str | None = None) -> tuple[int, bytes]:
    """GET /v1/events?query: the status and the first bytes of the answer."""
    url = urlsplit(service.base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request("GET", f"/v1/events{query}", headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read(200) if resp.status != 200 else resp.read1(200)
    finally:
        conn.close()


def test_an_event_ticket_opens_the_stream_once(service: Service) -> None:
    ticket = service.api.ok("POST", "/v1/events/ticket")["Ticket"]
    assert service.api.token not in ticket
    status, first = open_stream(service, f"?Ticket={ticket}")
    assert status == 200 and first.startswith(b"retry: 3000\nevent: ready\n"), first
    status, body = open_stream(service, f"?Ticket={ticket}")
    assert status == 401 and b"used already" in body
    assert open_stream(service, "", token=service.api.token)[0] == 401  # the token alone does not open it
    prefix, expires, nonce, mac = service.api.ok("POST", "/v1/events/ticket")["Ticket"].split(".")
    assert open_stream(service, f"?Ticket={prefix}.{int(expires) + 3600}.{nonce}.{mac}")[0] == 401  # not signed
    assert open_stream(service, f"?Ticket={prefix}.{expires}.{nonce}.{mac}")[0] == 200


def test_an_expired_ticket_is_refused() -> None:
    viewer = TokenIdentity("ab" * 32, "console-viewer", Role.VIEWER)
    body = f"{viewer.token_hash[:16]}.{int(time.time()) - 1}.some-nonce"
    with pytest.raises(Unauthorized, match="expired"):
        Tickets().redeem(f"{body}.{_mac(viewer.token_hash, body)}", [viewer])
    assert Tickets().redeem(Tickets().issue(viewer), [viewer]) == viewer


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_poller_reads_each_change_once(kind: str, tmp_path: Path) -> None:
    """On both databases: new jobs, child jobs that changed, presence; nothing twice though re-read."""
    with database_url(kind, tmp_path) as url:
        db = Store(url)
        try:
            db.call_sync(devices.register_device, "poll-dev", None, [])
            cursor = Cursor(since=now() - OVERLAP)
            assert db.call_sync(read_changes, cursor) == []  # the first presence read is the baseline
            wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False)
            job, _ = db.call_sync(jobs.submit_job, "job", wf.workflow_id, "DeviceId", "poll-dev", None)
            db.call_sync(devices.set_presence, [("poll-dev", True, now())])
            kinds = [e.split(b"\n")[0] for e in db.call_sync(read_changes, cursor)]
            assert kinds == [b"event: job", b"event: child"]  # presence is read every PRESENCE_EVERY polls
            db.call_sync(jobs.cancel_job, job.job_id)
            events = [e for _ in range(PRESENCE_EVERY) for e in db.call_sync(read_changes, cursor)]
            assert [e.split(b"\n")[0] for e in events] == [b"event: child", b"event: device"]
            assert b'"Status":"CANCELED"' in events[0] and b'"Online":true' in events[1]
        finally:
            db.close()


def test_a_burst_of_changes_is_one_resync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(changes, "MAX_ROWS", 2)
    db = Store(f"sqlite:///{tmp_path / 'burst.db'}")
    try:
        for device in ("b1", "b2", "b3"):
            db.call_sync(devices.register_device, device, "burst", [])
        cursor = Cursor(since=now() - OVERLAP)
        wf = db.call_sync(workflows.create_workflow, "wf", "true", None, False)
        db.call_sync(jobs.submit_job, "job", wf.workflow_id, "DeviceGroup", "burst", None)
        kinds = [e.split(b"\n")[0] for e in db.call_sync(read_changes, cursor)]
        assert kinds == [b"event: job", b"event: child", b"event: child", b"event: resync"]
        assert all(b"resync" not in e for e in db.call_sync(read_changes, cursor))  # maybe the rest, once
        assert db.call_sync(read_changes, cursor) == []  # then quiet: no resync over and over
    finally:
        db.close()


def test_the_stream_sends_new_jobs_and_child_changes(service: Service) -> None:
    api = service.api
    api.device("stream-dev", group="stream-group")
    ticket = api.ok("POST", "/v1/events/ticket")["Ticket"]
    url = urlsplit(service.base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=20)
    try:
        conn.request("GET", f"/v1/events?Ticket={ticket}")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        assert resp.readline() == b"retry: 3000\n"
        job = api.submit(api.workflow("true"), DeviceId="stream-dev")
        child = api.ok("GET", f"/v1/job/{job}/childjobs")[0]["JobId"]
        expected_child = json.dumps({"JobId": child, "ParentJobId": job, "DeviceId": "stream-dev",
                                     "Status": "QUEUED"}, separators=(",", ":"))
        expected = {("job", json.dumps({"JobId": job}, separators=(",", ":"))), ("child", expected_child)}
        seen = read_events(resp, until=expected)
        assert expected <= seen
        api.ok("POST", f"/v1/job/{job}/cancel")
        canceled = ("child", expected_child.replace('"QUEUED"', '"CANCELED"'))
        assert canceled in read_events(resp, until={canceled})
    finally:
        conn.close()


def read_events(resp: http.client.HTTPResponse, until: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """(event, data) pairs from the stream, until all of until came (the socket's timeout fails the test)."""
    seen: set[tuple[str, str]] = set()
    kind = ""
    while not until <= seen:
        line = resp.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: ") and kind != "ready":
            seen.add((kind, line[len("data: "):]))
    return seen


def test_the_console_is_served_with_a_strict_content_security_policy(service: Service) -> None:
    for path, kind in [("/", "text/html"), ("/console/console.js", "text/javascript"),
                       ("/console/console.css", "text/css")]:
        resp = service.api.request("GET", path, token=None)
        assert resp.status == 200 and resp.headers["Content-Type"].startswith(kind), path
        assert resp.headers["Content-Security-Policy"].startswith("default-src 'self'")
        assert resp.headers["X-Content-Type-Options"] == "nosniff"


def browser_or_skip():  # type: ignore[no-untyped-def]
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (Debian package chromium); runs under CI=true")
    from playwright.sync_api import sync_playwright
    return sync_playwright


UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea')]
    .filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.outerHTML)"""


@pytest.mark.timeout(90)
def test_a_group_job_submitted_through_the_forms_shows_its_results_live(launch: Launcher, tmp_path: Path) -> None:
    sync_playwright = browser_or_skip()
    service = launch.service()
    api = service.api
    for device in ("console-a", "console-b"):
        launch.agent(service, device, api.device(device, group="console-group", tags=["console-tag"]))
    api.device("console-idle", group="elsewhere", tags=["idle-tag"])
    api.submit(api.workflow("true", name="idle-wf"), name="waiting", DeviceId="console-idle")  # no agent: stays
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            drive_console(browser.new_page(), service, tmp_path)
        finally:
            browser.close()


def drive_console(page, service: Service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect
    hosts: set[str] = set()
    page.on("request", lambda request: hosts.add(urlsplit(request.url).hostname or request.url))
    shots = Path(SHOTS) if SHOTS else tmp_path

    page.goto(service.base_url + "/")
    assert page.evaluate(UNLABELLED) == []
    expect(page.get_by_label("API token")).to_be_focused()
    expect(page.get_by_role("navigation")).to_be_hidden()
    page.screenshot(path=str(shots / "sign-in.png"), full_page=True)
    page.keyboard.type("not-the-token")
    page.keyboard.press("Enter")
    expect(page.locator("#message")).to_have_text("The token was refused (the API token is not valid): sign in again.")
    expect(page.get_by_label("API token")).to_be_visible()
    page.keyboard.type(service.api.token)
    page.keyboard.press("Enter")
    page.evaluate("window.notReloaded = true")
    expect(page.locator("#live")).to_have_text("Live updates: on")

    # devices, filtered by group
    expect(page.locator("tr[data-device]")).to_have_count(3)
    page.get_by_label("Group").fill("console-group")
    page.keyboard.press("Enter")
    expect(page.locator("tr[data-device]")).to_have_count(2)
    expect(page.locator("tr[data-device='console-a'] td").nth(1)).to_have_text("online")
    page.get_by_label("Group").fill("")
    page.get_by_label("Tag").fill("idle-tag")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("tr[data-device]")).to_have_count(1)
    expect(page.locator("tr[data-device='console-idle']")).to_be_visible()
    page.get_by_label("Tag").fill("")
    page.get_by_label("Group").fill("console-group")
    page.get_by_label("Group").press("Enter")
    expect(page.locator("tr[data-device]")).to_have_count(2)
    page.screenshot(path=str(shots / "devices.png"), full_page=True)

    # define a workflow by keyboard alone, then submit it to the group
    page.get_by_role("link", name="New job").click()
    assert page.evaluate(UNLABELLED) == []
    page.get_by_label("Name", exact=True).focus()
    page.keyboard.type("console-wf")
    page.keyboard.press("Tab")
    page.keyboard.type("echo console-ok; echo warn >&2")
    page.keyboard.press("Enter")
    expect(page.locator("#message")).to_have_text("Workflow console-wf defined.")
    expect(page.get_by_label("Workflow", exact=True)).to_be_focused()
    page.get_by_label("Target", exact=True).select_option("DeviceGroup")
    page.get_by_label("Device id, group or tag").fill("console-group")
    page.get_by_label("Job name (optional)").fill("console-job")
    page.screenshot(path=str(shots / "new-job.png"), full_page=True)
    page.keyboard.press("Enter")

    # the job's children: both succeed, with their output, without a reload
    for device in ("console-a", "console-b"):
        row = page.locator(f"tr[data-child='{device}']")
        expect(row.locator("td.status")).to_have_text("SUCCEEDED", timeout=20000)
        expect(row.locator("pre.stdout")).to_have_text("console-ok")
        expect(row.locator("pre.stderr")).to_have_text("warn")
    page.screenshot(path=str(shots / "job.png"), full_page=True)

    page.get_by_role("link", name="Jobs").click()
    expect(page.locator("tr[data-job] td").nth(3)).to_contain_text("2 of 2 done, 2 succeeded")
    page.screenshot(path=str(shots / "jobs.png"), full_page=True)
    page.goto(service.base_url + "/#device/console-idle")  # the hash alone changes: no reload
    expect(page.get_by_role("heading", name="Device console-idle")).to_be_visible()
    expect(page.locator("ol.queue li")).to_have_text(["waiting true QUEUED"])
    page.screenshot(path=str(shots / "queue.png"), full_page=True)

    assert page.evaluate("window.notReloaded") is True
    assert hosts == {"127.0.0.1"}
