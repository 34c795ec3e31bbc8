"""GET /metrics, /healthz, and the hooks the dispatcher feeds: against a real service process."""

from __future__ import annotations

import uuid

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ota_bridge import metrics
from tests.support.fake_device import FakeDevice
from tests.support.processes import Api, Service, wait_until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = api.request("GET", "/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    return samples(resp.body)


def test_healthz_is_alive_without_a_token_beside_livez_and_readyz(service: Service) -> None:
    api = service.api
    for path in ("/healthz", "/livez"):
        resp = api.request("GET", path, token=None)
        assert resp.status == 200 and resp.body == {"Status": "ok"}
    assert api.request("GET", "/readyz", token=None).status == 200


def test_metrics_need_a_token(service: Service) -> None:
    assert service.api.request("GET", "/metrics", token=None).status == 401


def test_metrics_count_jobs_devices_requests_and_the_broker(service: Service) -> None:
    api = service.api
    device = f"m-{uuid.uuid4().hex[:8]}"
    api.device(device)
    workflow = api.workflow("true")
    for _ in range(3):
        api.submit(workflow, DeviceId=device)

    def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        found = scrape(api)  # the database's figures may be up to STATS_SECONDS old
        return found if found.get(("ota_bridge_jobs", (("state", "QUEUED"),)), 0) >= 3 else None

    found = wait_until(counted, 3 * metrics.STATS_SECONDS, "3 QUEUED jobs in /metrics")
    assert found[("ota_bridge_devices", (("state", "offline"),))] >= 1
    assert found[("ota_bridge_queue_depth_max", ())] >= 3
    assert found[("ota_bridge_queue_pending_jobs", ())] >= 3
    assert found[("ota_bridge_broker_connected", ())] == 1
    assert found[("ota_bridge_database_up", ())] == 1
    posted = ("ota_bridge_http_requests_total", (("method", "POST"), ("route", "/v1/job"), ("status", "200")))
    assert found[posted] >= 3
    latency = ("ota_bridge_http_request_seconds_count", (("method", "POST"), ("route", "/v1/job")))
    assert found[latency] >= 3


def test_the_running_dispatcher_feeds_its_publish_and_dispatch_figures(service: Service) -> None:
    api = service.api
    device = f"m-{uuid.uuid4().hex[:8]}"
    fake = FakeDevice(service.broker_url, device, api.device(device))
    try:
        fake.say_online()
        assert fake.next_head() is not None  # its first (idle) head, signed when it came online
        job = api.submit(api.workflow("true"), DeviceId=device)
        child = api.ok("GET", f"/v1/job/{job}/childjobs")[0]["JobId"]
        fake.head_for(child)
        fake.report(child, "SUCCEEDED", ExitCode=0, Stdout="")
        api.wait_job(job)
    finally:
        fake.close()
    found = scrape(api)
    assert found[("ota_bridge_heads_published_total", ())] >= 2  # its first (idle) head, the job's
    assert found[("ota_bridge_publish_seconds_count", ())] >= 1
    assert found[("ota_bridge_dispatch_seconds_count", ())] >= 1
    assert found[("ota_bridge_device_updates_total", (("outcome", "applied"),))] >= 1


def test_the_service_froze_its_start_up_objects_and_counts_its_collections(service: Service) -> None:
    def collected() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        found = scrape(service.api)  # a young collection comes within a few hundred allocations
        return found if found.get(("ota_bridge_gc_collections_total", (("generation", "0"),)), 0) > 0 else None

    found = wait_until(collected, 10, "a generation-0 collection counted in /metrics")
    assert found[("ota_bridge_gc_frozen_objects", ())] > 10_000  # imports, settings, the app: frozen at start-up
    assert found[("ota_bridge_gc_seconds_total", (("generation", "0"),))] > 0
    assert found[("ota_bridge_gc_longest_seconds", ())] > 0
    assert ("ota_bridge_gc_thaws_total", ()) in found


def test_a_request_for_no_route_is_counted_under_one_label(service: Service) -> None:
    api = service.api
    assert api.request("GET", f"/no/such/{uuid.uuid4().hex}").status == 404
    found = scrape(api)
    assert not any("/no/such" in dict(labels).get("route", "") for _, labels in found)
    assert found[("ota_bridge_http_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))]


def test_the_dispatcher_hooks_show_in_the_exposition() -> None:
    before = samples(metrics.exposition().decode())
    metrics.published(4, 0.02)
    metrics.dispatched(0.5)
    metrics.device_updates(applied=2, dropped=1)
    metrics.webhook_delivery("retry")
    after = samples(metrics.exposition().decode())

    def grew(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0)

    assert grew("ota_bridge_heads_published_total") == 4
    assert grew("ota_bridge_publish_seconds_count") == 1
    assert grew("ota_bridge_dispatch_seconds_count") == 1
    assert grew("ota_bridge_device_updates_total", (("outcome", "applied"),)) == 2
    assert grew("ota_bridge_device_updates_total", (("outcome", "dropped"),)) == 1
    assert grew("ota_bridge_device_updates_total", (("outcome", "late"),)) == 0
    assert grew("ota_bridge_webhook_deliveries_total", (("outcome", "retry"),)) == 1


def test_request_counts_expose_what_prometheus_clients_counter_and_histogram_would() -> None:
    """metrics.HttpRequests counts in plain numbers; its exposition is the text a prometheus_client
    Counter and Histogram of the same names, labels and buckets give for the same requests (the
    _created times apart, which each takes from its own clock)."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counted = metrics.HttpRequests()
    ours.register(counted)
    counter = Counter("http_requests", metrics.HTTP_REQUESTS_HELP, ["method", "route", "status"],
                      namespace=metrics.NAMESPACE, registry=theirs)
    histogram = Histogram("http_request_seconds", metrics.HTTP_SECONDS_HELP, ["method", "route"],
                          namespace=metrics.NAMESPACE, registry=theirs, buckets=metrics.LATENCY_BUCKETS)
    requests = [("GET", "/v1/job/{id}", 200, 0.0004), ("GET", "/v1/job/{id}", 200, 0.001),  # on a bound
                ("GET", "/v1/job/{id}", 404, 0.0031), ("POST", "/v1/job", 200, 0.2), ("GET", "unmatched", 404, 31.0),
                ("POST", "/v1/job", 500, 7.5), ("GET", "/v1/job/{id}", 200, 0.0)]
    for method, route, status, seconds in requests:
        counted.count(method, route, status, seconds)
        counter.labels(method, route, str(status)).inc()
        histogram.labels(method, route).observe(seconds)

    def text(registry: CollectorRegistry) -> list[str]:
        lines = generate_latest(registry).decode().splitlines()
        return sorted(line.rsplit(" ", 1)[0] if "_created{" in line else line for line in lines)

    assert text(ours) == text(theirs)
    assert len([line for line in text(ours) if line.startswith("ota_bridge_http_request_seconds_bucket")]) == 45
