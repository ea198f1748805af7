"""Prometheus series of a server (`GET /metrics`) and the middleware that counts every request."""

from __future__ import annotations

import time

LATENCY_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """In a registry of its own: several servers may share a process in tests."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tollgate_requests", "HTTP requests", ["endpoint", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "tollgate_request_latency_seconds",
            "Request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=LATENCY_S,
        )
        self.batch = Histogram(
            "tollgate_batch_size",
            "Images per forward pass",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.version = Gauge(
            "tollgate_model_version", "Served model version", ["model", "version"], registry=self.registry
        )
        self.alias_checked = Gauge(
            "tollgate_alias_checked_timestamp_seconds",
            "When the server last read the alias it follows (Unix time)",
            registry=self.registry,
        )
        self.follow_errors = Counter(
            "tollgate_follow_errors",
            "Alias checks that could not load what the alias names (the old model keeps serving)",
            registry=self.registry,
        )

        self.samples = Counter(
            "tollgate_live_samples",
            "Images sampled for monitoring (monitor.sample_fraction)",
            registry=self.registry,
        )
        self.samples_dropped = Counter(
            "tollgate_live_samples_dropped",
            "Sampled images dropped because the writer's queue was full or the disk refused them",
            registry=self.registry,
        )
        self.drift_window = Gauge(
            "tollgate_drift_window_samples", "Samples in the rolling drift window", registry=self.registry
        )
        self.drift_effect = Gauge(
            "tollgate_drift_effect",
            "Rolling drift effect size per check (pipeline/monitoring/drift.py) of the served version",
            ["check"],
            registry=self.registry,
        )
        self.drift_flag = Gauge(
            "tollgate_drift_detected", "1 when the check flags drift now", ["check"], registry=self.registry
        )
        self.accuracy = Gauge(
            "tollgate_accuracy_estimate",
            "Label-free accuracy estimate (ATC) of the rolling window, and its interval",
            ["bound"],
            registry=self.registry,
        )
        self.feedback = Counter(
            "tollgate_feedback", "POST /feedback answers by status", ["code"], registry=self.registry
        )
        self.shadow = Counter(
            "tollgate_shadow_images",
            "Shadow challenger outcomes: agree, disagree, error (it raised), dropped (its queue was full)",
            ["outcome"],
            registry=self.registry,
        )
        self.shadow_latency = Histogram(
            "tollgate_shadow_latency_seconds",
            "Challenger forward pass per request, off the request path",
            registry=self.registry,
            buckets=LATENCY_S,
        )
        self.shadow_version = Gauge(
            "tollgate_shadow_version",
            "Challenger version in shadow",
            ["model", "version"],
            registry=self.registry,
        )
        # Split by variant (champion, canary) only while a canary is loaded: the rollout's figures.
        self.variant_requests = Counter(
            "tollgate_variant_requests",
            "Predictions by variant, version and outcome (ok, error) while a canary is loaded",
            ["variant", "version", "outcome"],
            registry=self.registry,
        )
        self.variant_latency = Histogram(
            "tollgate_variant_latency_seconds",
            "Queueing and forward pass per prediction, by variant",
            ["variant"],
            registry=self.registry,
            buckets=LATENCY_S,
        )
        self.variant_confidence = Histogram(
            "tollgate_variant_confidence",
            "Top-class probability of the first image of each prediction, by variant",
            ["variant"],
            registry=self.registry,
            buckets=(0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99, 1.0),
        )
        self.variant_samples = Counter(
            "tollgate_variant_live_samples",
            "Sampled requests by variant",
            ["variant"],
            registry=self.registry,
        )
        self.canary = Gauge(
            "tollgate_canary_weight_percent",
            "Share of requests routed to @canary, by its version (absent: no canary)",
            ["model", "version"],
            registry=self.registry,
        )

    def canary_served(self, name: str, version: str | None, weight: float) -> None:
        self.canary.clear()
        if version is not None:
            self.canary.labels(name, version).set(weight)

    def served(self, name: str, version: str) -> None:
        self.version.clear()
        self.version.labels(name, version).set(1)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Measure:
    """Counts and times every request by route template and status (a plain ASGI middleware: Starlette's
    BaseHTTPMiddleware costs more per request than a batched forward pass here)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = route.path if route is not None else "unmatched"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
