"""Prometheus metrics, on a registry per service so several services (tests) never clash.

The HTTP counters live here too: the HTTP layer counts its answers into the same registry.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()

        def histogram(
            name: str, doc: str, label: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS
        ) -> Histogram:
            return Histogram(name, doc, [label], buckets=buckets, registry=registry)

        self.requests = Counter(
            "blip2_http_requests", "HTTP requests by route and status.", ["route", "method", "status"],
            registry=registry,
        )  # fmt: skip
        self.request_seconds = histogram(
            "blip2_http_request_seconds", "HTTP request latency by route.", "route"
        )
        self.stage_seconds = histogram("blip2_stage_seconds", "Latency of each pipeline stage.", "stage")
        self.batch_items = histogram(
            "blip2_inference_batch_items", "Items per batched model call.", "kind", buckets=_BATCH_BUCKETS
        )
        self.batch_seconds = histogram(
            "blip2_inference_batch_seconds", "Duration of batched model calls.", "kind"
        )
        self.index_generation = Gauge(
            "blip2_index_generation", "Catalog generation the served index reflects.", registry=registry
        )
        self.index_images = Gauge("blip2_index_images", "Images in the served index.", registry=registry)
        self.queue_depth = Gauge(
            "blip2_inference_queue_depth", "Jobs waiting for the model worker.", registry=registry
        )
        self.captions = Counter(
            "blip2_captions", "Captions served, by source.", ["source"], registry=registry
        )

    def on_batch(self, kind: str, items: int, seconds: float) -> None:
        self.batch_items.labels(kind).observe(items)
        self.batch_seconds.labels(kind).observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The registry in the text exposition format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
