"""The served model and the batcher that runs requests through it.

A `ModelSlot` holds the model behind `<name>@champion` (or one pinned model); readers take one reference and a
reload swaps it, so each request keeps the model it was validated against. The `Batcher` runs everything
queued through one forward pass, up to `serve.max_batch_size` images, waiting at most `serve.max_latency_ms`
for a batch to fill, on a worker thread so the event loop keeps taking requests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.core import failpoints
from pipeline.core.config import ServeConfig
from pipeline.monitoring import drift
from pipeline.registry.store import CHAMPION, Reads
from pipeline.serving import served as served_model
from pipeline.serving.prometheus import Metrics
from pipeline.serving.served import Served
from pipeline.training import runtimes


class NoModel(LookupError):
    """Nothing to serve yet: the registry has no @champion."""


class ModelSlot:
    """By default it follows `<name>@champion` (or another `alias`); with `model_uri` it serves that one
    model (a candidate under infra validation) and reload is a no-op. With `runtime` other than torch, a
    version whose folder names a gated ONNX artefact (`pipeline.training.runtimes`) is answered by ONNX
    Runtime on `threads` threads."""

    def __init__(self, store: Reads, name: str, model_uri: str | None = None, alias: str = CHAMPION,
                 runtime: str = runtimes.TORCH, threads: int = 0):  # fmt: skip
        self.store = store
        self.name = name
        self.model_uri = model_uri
        self.alias = alias
        self.runtime = runtime
        self.threads = threads
        self.current: Served | None = None
        self._reload_lock = threading.Lock()

    def _target(self) -> tuple[str, str]:
        if self.model_uri is not None:
            return "candidate", self.model_uri
        ref = self.store.version(self.name, self.alias)
        if ref is None:
            raise NoModel(f"{self.name} has no @{self.alias} yet: run the pipeline first (dvc repro)")
        return ref.version, ref.uri

    def reload(self) -> Served:
        """Load what the alias names now, warm it up, then swap it in; the old model serves until then."""
        with self._reload_lock:
            version, uri = self._target()
            if self.current is not None and self.current.version == version:
                return self.current
            if self.current is not None:
                failpoints.reach("serve:swap")
            served = self.store.read_model_dir(uri, lambda folder: self._read(version, folder))
            served.predict(np.zeros((1, *served.meta["input_shape"]), np.uint8), False)  # warm up first
            self.current = served
            return self.current

    def _read(self, version: str, folder) -> Served:
        served = served_model.read(version, folder, self.runtime, self.threads, drift.read_reference(folder))
        if served.onnx is None and self.threads:
            import torch

            torch.set_num_threads(self.threads)
        return served

    def like(self, alias: str) -> ModelSlot:
        """A slot for another alias of the same model, served the same way (the canary, the challenger)."""
        return ModelSlot(self.store, self.name, alias=alias, runtime=self.runtime, threads=self.threads)

    def clear(self) -> None:
        """Serve nothing from this slot (the alias it follows was removed)."""
        with self._reload_lock:
            self.current = None


class Batcher:
    """Runs queued requests through the model together, one forward pass at a time, off the event loop."""

    def __init__(self, cfg: ServeConfig, metrics: Metrics):
        self.max_batch = cfg.max_batch_size
        self.max_wait = cfg.max_latency_ms / 1000
        self.metrics = metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="forward")

    async def predict(self, served: Served, x: np.ndarray, embeddings: bool = False, timing=None):
        """Probabilities for `x`; with `embeddings`, (probabilities, penultimate-layer outputs). `timing`
        gets `others_s`: how long the request waited for another model's group in its batch."""
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((served, x, fut, embeddings))
        probs, emb, waited = await fut
        if timing is not None:
            timing["others_s"] = waited
        return (probs, emb) if embeddings else probs

    def _drain(self, items: list, size: int) -> int:
        while size < self.max_batch and not self.queue.empty():
            item = self.queue.get_nowait()
            items.append(item)
            size += len(item[1])
        return size

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            size = self._drain(items, len(items[0][1]))
            if size < self.max_batch and self.max_wait > 0:
                # Requests arriving while the previous batch ran are already queued; give stragglers one
                # short window rather than a wait per request.
                await asyncio.sleep(self.max_wait)
                size = self._drain(items, size)
            self.metrics.batch.observe(size)
            await self._forward(loop, items)

    async def _forward(self, loop, items: list) -> None:
        # A reload may land between two requests: each group runs on the model it was validated against.
        groups: dict[int, list] = {}
        for item in items:
            groups.setdefault(id(item[0]), []).append(item)
        # With a canary beside the champion, a group also waits for the other model's forward pass before
        # it: each request is told how long (`others`), so a rollout compares the models, not their order.
        others = 0.0
        for group in groups.values():
            served = group[0][0]
            x = np.concatenate([i[1] for i in group])
            # Embeddings come from the same pass (a hook on the last layer) when a sampled request wants them.
            wanted = any(i[3] for i in group)
            began = time.perf_counter()
            try:
                probs, emb = await loop.run_in_executor(self.worker, served.predict, x, wanted)
            except Exception as err:  # noqa: BLE001 - hand the failure to every waiting request
                for _, _, fut, _ in group:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            finally:
                waited, others = others, others + time.perf_counter() - began
            start = 0
            for _, xi, fut, want in group:
                if not fut.done():
                    end = start + len(xi)
                    fut.set_result((probs[start:end], emb[start:end] if want else None, waited))
                start += len(xi)
