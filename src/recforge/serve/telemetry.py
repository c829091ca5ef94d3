"""Prometheus series the server exports on /metrics, in a registry of its own (one per app instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("recforge_requests", "Requests by route, variant and HTTP status.",
                                ["route", "variant", "status"], registry=r)
        self.latency = Histogram("recforge_request_seconds", "Request latency by route and variant.",
                                 ["route", "variant"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("recforge_errors", "Model errors by route and model kind.", ["route", "kind"],
                              registry=r)
        self.model_version = Gauge("recforge_model_version", "Loaded model version by kind and role.",
                                   ["kind", "model", "role"], registry=r)
        self.reloads = Counter("recforge_reloads", "Model reloads by result (changed, unchanged, failed).",
                               ["result"], registry=r)
        self.canary_rollbacks = Counter("recforge_canary_rollbacks", "Automatic canary rollbacks.", ["kind"],
                                        registry=r)
        self.events = Counter("recforge_events_accepted", "Events stored, by type.", ["type"], registry=r)
        self.event_write_failures = Counter(
            "recforge_event_write_failures", "Event batches answered 503 because the event store could not write "
            "(disk full, read-only).", registry=r)
        self.batch_size = Histogram("recforge_batch_size", "Requests merged into one model call.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.cold_start = Counter("recforge_cold_start", "Recommendations answered from popularity.", registry=r)
        self.degraded = Counter("recforge_degraded", "Requests answered without the user's online state (the "
                                "shared state store could not be read).", registry=r)
        self.served_unrecorded = Counter("recforge_served_unrecorded", "Requests whose served features could not "
                                         "be logged (their impressions are stored without them).", registry=r)
        self.redis_latency = Histogram("recforge_redis_seconds", "Latency of calls to the shared Redis, by operation.",
                                       ["operation"], buckets=LATENCY_BUCKETS, registry=r)
        self.redis_errors = Counter("recforge_redis_errors", "Failed calls to the shared Redis, by operation.",
                                    ["operation"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
