"""One object every route of a server reads: the params, the model slot, the batcher, the live-traffic
workers and the tokens; plus the request helpers the routes share (bodies read within bounds, request ids,
authorization)."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import Request

from pipeline.core.config import Params
from pipeline.data.shards import REQUEST_ID
from pipeline.serving import protocols
from pipeline.serving.batching import Batcher, ModelSlot, Served
from pipeline.serving.prometheus import Metrics
from pipeline.serving.protocols import Refused

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

    def model_named(self, model_name: str, version: str | None = None) -> Served:
        """The served model when a request names it (and, when it names one, its served version)."""
        if model_name != self.name:
            raise Refused(404, f"unknown model {model_name!r}; this server serves {self.name!r}")
        served = self.served_now()
        if version is not None and version != served.version:
            raise Refused(
                404,
                f"{self.name} version {version!r} is not served here; this server serves v{served.version}",
            )
        return served

    async def predicted(self, served: Served, x: np.ndarray, rid: str) -> np.ndarray:
        """The batcher's probabilities; a sampled request also hands its input, outputs and embeddings to
        the sampler (and the shadow challenger), neither of which it waits for."""
        sampler = self.workers.get("sampler")
        if sampler is None or not sampler.wanted():
            return await self.batcher.predict(served, x)
        probs, emb = await self.batcher.predict(served, x, embeddings=True)
        sampler.offer(rid, served, x, probs, emb)
        if "shadow" in self.workers:
            self.workers["shadow"].offer(rid, served, x, probs)
        return probs

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
