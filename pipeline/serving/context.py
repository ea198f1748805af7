"""One object every route of a server reads: the params, the model slot, the batcher, the live-traffic
workers and the tokens; plus the request helpers the routes share (bodies read within bounds, request ids,
authorization)."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import Request

from pipeline.core import failpoints
from pipeline.core.config import Params
from pipeline.data.shards import REQUEST_ID
from pipeline.serving import protocols, routing
from pipeline.serving.batching import Batcher, ModelSlot, Served
from pipeline.serving.prometheus import Metrics
from pipeline.serving.protocols import Refused
from pipeline.serving.recent import Answered, Recent

CHAMPION, CANARY = "champion", "canary"  # the variants a request can go to

# Bodies up to this size are parsed on the event loop (well under a millisecond, less than a hand-off to a
# thread costs); larger ones, and every image decode, run on a thread so other requests keep flowing.
INLINE_BYTES = 64 * 1024


@dataclass
class ServerContext:
    params: Params
    slot: ModelSlot
    token: str  # the admin token (/admin/reload)
    feedback_token: str  # what /feedback wants
    metrics: Metrics
    root: Path | None  # the checkout of a champion-following server; None for a pinned one
    follows: bool  # re-reads the alias every serve.follow_interval_s
    followed: dict  # the alias, interval, last check and last error, for /metrics and the OIP metadata
    batcher: Batcher | None = None  # set when the app starts
    workers: dict = field(default_factory=dict)  # "sampler", "shadow": the live-traffic workers running
    feedback_folder: object = None  # where /feedback stores labelled inputs (a shards.Folder), with sampling
    canary: ModelSlot | None = None  # @canary beside the champion (a champion-following server only)
    canary_weight: float = 0.0  # percent of requests routed to it (the registry's tag, read with the alias)
    recent: Recent = field(default_factory=Recent)  # answers of both variants while a canary is loaded

    @property
    def name(self) -> str:
        return self.params.registry.model_name

    @property
    def max_body(self) -> int:
        return int(self.params.serve.max_body_mb * 1024 * 1024)

    def served_now(self) -> Served:
        served = self.slot.current
        if served is None:
            raise Refused(503, f"no model loaded: {self.name} has no @champion yet")
        return served

    def canary_now(self) -> Served | None:
        """The canary when one is loaded beside a different champion."""
        canary = self.canary.current if self.canary is not None else None
        champion = self.slot.current
        if canary is None or champion is None or canary.version == champion.version:
            return None
        return canary

    def served_for(self, headers, rid: str) -> tuple[Served, str]:
        """(model, variant) that answers this request: the canary for its share of routing keys."""
        champion = self.served_now()
        canary = self.canary_now()
        if canary is not None and routing.to_canary(headers, rid, self.canary_weight):
            return canary, CANARY
        return champion, CHAMPION

    def model_named(
        self, model_name: str, version: str | None = None, headers=None, rid: str = ""
    ) -> tuple[Served, str]:
        """(model, variant) when a request names the model: the version it names (the champion's or the
        canary's), else the one routing picks for it."""
        if model_name != self.name:
            raise Refused(404, f"unknown model {model_name!r}; this server serves {self.name!r}")
        if version is None:
            return (self.served_now(), CHAMPION) if headers is None else self.served_for(headers, rid)
        champion, canary = self.served_now(), self.canary_now()
        if version == champion.version:
            return champion, CHAMPION
        if canary is not None and version == canary.version:
            return canary, CANARY
        raise Refused(
            404, f"{self.name} version {version!r} is not served here; this server serves v{champion.version}"
        )

    async def predicted(self, served: Served, x: np.ndarray, rid: str, variant: str = CHAMPION) -> np.ndarray:
        """The batcher's probabilities; a sampled request also hands its input, outputs and embeddings to
        the sampler (and the shadow challenger), neither of which it waits for. While a canary is loaded,
        each answer of either variant is kept for the rollout's analysis and counted by variant (from weight
        > 0 on: at 0 the rollout only waits for servers to load the canary, so it costs nothing)."""
        if self.canary_weight <= 0 or self.canary_now() is None:  # weight 0: nothing to compare yet
            return await self._predicted(served, x, rid)
        start, timing = time.perf_counter(), {}
        try:
            if variant == CANARY:
                failpoints.reach("serve:canary")
            probs = await self._predicted(served, x, rid, variant, timing)
        except Exception as err:  # noqa: BLE001 - a failed answer is a figure of the variant's health
            self._answered(rid, served, variant, time.perf_counter() - start, None)
            raise Refused(500, f"{self.name} v{served.version} failed: {type(err).__name__}: {err}") from None
        # The time spent behind the other model's forward pass is the batch's, not this model's.
        self._answered(rid, served, variant, time.perf_counter() - start - timing.get("others_s", 0.0), probs)
        return probs

    async def _predicted(self, served: Served, x, rid: str, variant: str = CHAMPION, timing=None):
        sampler = self.workers.get("sampler")
        if sampler is None or not sampler.wanted():
            return await self.batcher.predict(served, x, timing=timing)
        probs, emb = await self.batcher.predict(served, x, embeddings=True, timing=timing)
        sampler.offer(rid, served, x, probs, emb)
        if timing is not None:  # the canary path: samples are counted by variant
            self.metrics.variant_samples.labels(variant).inc()
        if "shadow" in self.workers:
            self.workers["shadow"].offer(rid, served, x, probs)
        return probs

    def _answered(self, rid: str, served: Served, variant: str, latency: float, probs: np.ndarray | None):
        m = self.metrics
        m.variant_requests.labels(variant, served.version, "error" if probs is None else "ok").inc()
        answered = Answered(time.time(), variant, served.version, latency * 1000, probs is None)
        if probs is not None:
            top = probs.max(axis=1)
            classes = served.meta["classes"]
            answered.confidence = float(top[0])
            answered.predicted = tuple(classes[i] for i in probs.argmax(axis=1))
            m.variant_latency.labels(variant).observe(latency)
            m.variant_confidence.labels(variant).observe(answered.confidence)
        self.recent.record(rid, answered)

    async def body_of(self, request: Request, limit: int | None = None) -> bytes:
        return await protocols.read_body(request.headers, request_chunks(request), limit or self.max_body)


def context_of(request: Request) -> ServerContext:
    return request.app.state.ctx


def request_id(headers) -> str:
    """The client's X-Request-ID when it is safe to keep (it names feedback files), else a new one."""
    given = headers.get("x-request-id")
    return given if given and REQUEST_ID.match(given) else uuid.uuid4().hex


async def off_loop(body: bytes, fn, *args):
    """`fn(*args)`, the parsing of `body`: inline for a small body, on a worker thread for a large one."""
    if len(body) <= INLINE_BYTES:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def request_chunks(request: Request):
    from starlette.requests import ClientDisconnect

    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise Refused(400, "client disconnected before sending the whole body") from None


def authorized(header: str, token: str) -> bool:
    given = header.removeprefix("Bearer ").strip()
    # Bytes, not str: compare_digest refuses non-ASCII text, and any header byte is possible.
    return secrets.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode())
