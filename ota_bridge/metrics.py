"""The service's Prometheus metrics, served at GET /metrics in the text format.

Two kinds. Counters and histograms the running code feeds through the small functions below
(`published`, `dispatched`, `device_updates`, `http_request`, `webhook_delivery`), kept in this
process. And gauges read from the database when Prometheus scrapes (jobs by state, queue depths,
devices by state), at most every STATS_SECONDS: every instance of a cluster reports the same
fleet-wide figures for those, so aggregate them with max(), not sum().

Everything lives in REGISTRY, not prometheus_client's global registry, so that the API serves
exactly these and several apps in one test process do not clash.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from .gc_pauses import GcStats
from .store.stats import FleetStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATS_SECONDS = 5.0  # how old the database figures may be when scraped
NAMESPACE = "ota_bridge"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REGISTRY = CollectorRegistry()

PUBLISHED = Counter("heads_published", "Device queue heads read and published to the broker",
                    namespace=NAMESPACE, registry=REGISTRY)
PUBLISH_SECONDS = Histogram("publish_seconds", "One publisher batch: reading the changed queues and publishing "
                            "their heads", namespace=NAMESPACE, registry=REGISTRY, buckets=LATENCY_BUCKETS)
DISPATCH_SECONDS = Histogram("dispatch_seconds", "One batch of device messages: from taking it off the inbox to "
                             "its results stored and the queues marked for publishing", namespace=NAMESPACE,
                             registry=REGISTRY, buckets=LATENCY_BUCKETS)
DEVICE_UPDATES = Counter("device_updates", "Job updates from devices, by outcome: applied, late (result kept "
                         "beside a job the service had ended) or dropped", ["outcome"], namespace=NAMESPACE,
                         registry=REGISTRY)
HTTP_REQUESTS_HELP = "REST API requests by method, route and status"
HTTP_SECONDS_HELP = "REST API request latency by method and route"


class HttpRequests(Collector):
    """REST API requests by method, route and status (a counter, `http_requests`), and their
    latency by method and route (a histogram, `http_request_seconds`, LATENCY_BUCKETS): what a
    prometheus_client Counter and Histogram of those names expose, _created included, counted in
    plain numbers. Only the event loop counts (the API middleware, `http_request`) and reads them
    (the scrape): prometheus_client's take a lock per count and per observation, ~5 us a request."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], list[float]] = {}  # [count, created]
        self.latencies: dict[tuple[str, str], list[float]] = {}  # per bucket, +Inf last; then sum, created

    def count(self, method: str, route: str, status: int, seconds: float) -> None:
        counted = self.counts.get((method, route, status))
        if counted is None:
            counted = self.counts[(method, route, status)] = [0, time.time()]
        counted[0] += 1
        latency = self.latencies.get((method, route))
        if latency is None:
            latency = self.latencies[(method, route)] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0, time.time()]
        latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: the first bound >= seconds
        latency[-2] += seconds

    def describe(self) -> Iterable[Metric]:
        return (CounterMetricFamily(f"{NAMESPACE}_http_requests", HTTP_REQUESTS_HELP),
                HistogramMetricFamily(f"{NAMESPACE}_http_request_seconds", HTTP_SECONDS_HELP))

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(f"{NAMESPACE}_http_requests", HTTP_REQUESTS_HELP,
                                       labels=["method", "route", "status"])
        for (method, route, status), (n, created) in list(self.counts.items()):
            requests.add_metric([method, route, str(status)], n, created=created)
        yield requests
        latency = HistogramMetricFamily(f"{NAMESPACE}_http_request_seconds", HTTP_SECONDS_HELP,
                                        labels=["method", "route"])
        for (method, route), values in list(self.latencies.items()):
            cumulative = [sum(values[:i + 1]) for i in range(len(LATENCY_BUCKETS) + 1)]
            bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
            latency.add_metric([method, route], list(zip(bounds, cumulative, strict=True)), values[-2])
            latency.samples.append(Sample(f"{latency.name}_created", {"method": method, "route": route},
                                          values[-1], None))
        yield latency


HTTP_REQUESTS = HttpRequests()
REGISTRY.register(HTTP_REQUESTS)
WEBHOOK_DELIVERIES = Counter("webhook_deliveries", "Webhook POSTs by outcome: delivered, retry (will be tried "
                             "again) or failed (gave up)", ["outcome"], namespace=NAMESPACE, registry=REGISTRY)

UPDATE_OUTCOMES = ("applied", "late", "dropped")
for _outcome in UPDATE_OUTCOMES:
    DEVICE_UPDATES.labels(_outcome)
for _outcome in ("delivered", "retry", "failed"):
    WEBHOOK_DELIVERIES.labels(_outcome)


# --- hooks for the running code -------------------------------------------------------------


def published(heads: int, seconds: float) -> None:
    """The publisher published `heads` queue heads in one batch that took `seconds`."""
    PUBLISHED.inc(heads)
    PUBLISH_SECONDS.observe(seconds)


def dispatched(seconds: float) -> None:
    """One batch of device messages was handled (stored, queues marked) in `seconds`."""
    DISPATCH_SECONDS.observe(seconds)


def device_updates(applied: int = 0, late: int = 0, dropped: int = 0) -> None:
    for outcome, n in zip(UPDATE_OUTCOMES, (applied, late, dropped), strict=True):
        if n:
            DEVICE_UPDATES.labels(outcome).inc(n)


def http_request(method: str, route: str, status: int, seconds: float) -> None:
    """One answer of the REST API (on the event loop only: see HttpRequests)."""
    HTTP_REQUESTS.count(method, route, status, seconds)


def webhook_delivery(outcome: str) -> None:
    WEBHOOK_DELIVERIES.labels(outcome).inc()


# --- read at scrape time --------------------------------------------------------------------


@dataclass
class Readings:
    """What the scrape reads besides the counters: the database's figures (cached) and the broker link."""

    read_stats: Callable[[], FleetStats]  # blocking; the API runs it on the store's thread first
    broker_connected: Callable[[], bool]
    stats: FleetStats | None = None
    read_at: float = float("-inf")
    database_up: bool = False

    def stale(self) -> bool:
        return time.monotonic() - self.read_at >= STATS_SECONDS

    def remember(self, stats: FleetStats | None) -> None:
        """The figures just read, or None when the database did not answer (the old ones are dropped)."""
        self.stats, self.database_up, self.read_at = stats, stats is not None, time.monotonic()


class FleetCollector(Collector):
    def __init__(self, readings: Readings) -> None:
        self.readings = readings

    def describe(self) -> Iterable[Metric]:
        return ()  # names are not checked for clashes: these are the only gauges of their names

    def collect(self) -> Iterable[Metric]:
        r = self.readings
        yield gauge("broker_connected", "1 while the service is connected to the MQTT broker", r.broker_connected())
        yield gauge("database_up", "1 when the database answered the last read of these figures", r.database_up)
        if r.stats is None:
            return
        yield labelled("jobs", "Child jobs (one per device and job) by state", "state", r.stats.jobs)
        yield labelled("devices", "Registered devices: online, offline, or disabled", "state", r.stats.devices)
        yield gauge("queue_pending_jobs",
                    "Unfinished (SCHEDULED, QUEUED, DOWNLOADING, IN_PROGRESS) jobs in all device queues",
                    r.stats.pending_jobs)
        yield gauge("queue_devices_with_pending", "Devices with at least one unfinished job",
                    r.stats.devices_with_pending)
        yield gauge("queue_depth_max", "The most unfinished jobs one device has",
                    r.stats.deepest_queue)


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NAMESPACE}_{name}", documentation, value=float(value))


def labelled(name: str, documentation: str, label: str, values: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{NAMESPACE}_{name}", documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


class GcCollector(Collector):
    """What Python's garbage collector cost this process (gc_pauses.Collector counts it): a long
    collection stalls the event loop, the broker and the API with it."""

    def __init__(self, stats: GcStats) -> None:
        self.stats = stats

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        s = self.stats
        seconds = CounterMetricFamily(f"{NAMESPACE}_gc_seconds", "Time in garbage collections by generation "
                                      "(the event loop stands still meanwhile)", labels=["generation"])
        collections = CounterMetricFamily(f"{NAMESPACE}_gc_collections", "Garbage collections by generation",
                                          labels=["generation"])
        for generation, (n, took) in enumerate(zip(s.collections, s.seconds, strict=True)):
            seconds.add_metric([str(generation)], took)
            collections.add_metric([str(generation)], n)
        yield seconds
        yield collections
        yield gauge("gc_longest_seconds", "The longest single garbage collection since start-up", s.longest)
        yield gauge("gc_frozen_objects", "Objects frozen out of the collector's generations (gc.freeze), "
                    "counted as they were frozen (those freed since not subtracted)",
                    s.frozen)
        yield CounterMetricFamily(f"{NAMESPACE}_gc_thaws", "Times the frozen heap was collected once (it had "
                                  "doubled)", value=s.thaws)
        yield CounterMetricFamily(f"{NAMESPACE}_gc_thawed_garbage_objects", "Objects those collections freed: "
                                  "garbage that waited while frozen", value=s.thawed_garbage)


_watched: list[Collector] = []
_gc_watched: list[Collector] = []


def _watch_only(watched: list[Collector], collector: Collector) -> None:
    """Register `collector` in place of the one an earlier app (or service) of this process registered."""
    while watched:
        REGISTRY.unregister(watched.pop())
    REGISTRY.register(collector)
    watched.append(collector)


def watch(readings: Readings) -> None:
    """Report these readings at scrape time (replacing those of an earlier app in this process)."""
    _watch_only(_watched, FleetCollector(readings))


def watch_gc(stats: GcStats) -> None:
    """Report the garbage collector's figures at scrape time (replacing an earlier service's in this process)."""
    _watch_only(_gc_watched, GcCollector(stats))


def exposition() -> bytes:
    return generate_latest(REGISTRY)
