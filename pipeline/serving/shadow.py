"""The shadow challenger (`serve.shadow`): `@challenger` runs on the sampled requests on a thread of its
own, after their responses are computed, and what it would have answered is recorded beside what the
champion did: agreement, both confidences, its latency. A challenger that raises, sleeps or cannot be
loaded never touches a response: its queue is bounded (a full one drops and counts), its errors are
counted, and the champion's path does not wait on it.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.core import failpoints
from pipeline.data import shards
from pipeline.registry.store import CHALLENGER
from pipeline.serving.batching import ModelSlot, NoModel
from pipeline.serving.prometheus import Metrics
from pipeline.serving.worker import STOP, Worker


class Shadow(Worker):
    def __init__(self, slot: ModelSlot, size: int, folder: shards.Folder, flush_s: float, metrics: Metrics):
        super().__init__(size, "shadow")
        self.slot = slot
        self.folder = folder
        self.flush_s = flush_s
        self.metrics = metrics
        self.checked = 0.0
        self._rows: list[dict] = []
        self._seq = 0
        self.start()

    def offer(self, request: str, served, x: np.ndarray, probs: np.ndarray) -> None:
        if not self.hand((time.time(), request, served, x, probs)):
            self.metrics.shadow.labels("dropped").inc(len(x))

    def _challenger(self):
        """The model behind @challenger, re-read at most every flush interval; None when there is none."""
        if time.time() - self.checked >= self.flush_s or self.slot.current is None:
            self.checked = time.time()
            try:
                served = self.slot.reload()
                self.metrics.shadow_version.clear()
                self.metrics.shadow_version.labels(self.slot.name, served.version).set(1)
            except NoModel:
                self.slot.current = None
            except Exception as err:  # noqa: BLE001 - a challenger that cannot load is counted, not fatal
                self.metrics.shadow.labels("error").inc()
                print(f"[tollgate] shadow: cannot load @{CHALLENGER}: {err}", flush=True)
        return self.slot.current

    def _run(self) -> None:
        last_write = time.time()
        while True:
            item = self.next(self.flush_s)
            if item is STOP:
                self._write()
                return
            try:
                if item is not None:
                    self._score(*item)
                if self._rows and time.time() - last_write >= self.flush_s:
                    self._write()
                    last_write = time.time()
            except Exception as err:  # noqa: BLE001 - the shadow goes on; the champion never noticed
                self.metrics.shadow.labels("error").inc()
                print(f"[tollgate] shadow: {type(err).__name__}: {err}", flush=True)

    def _score(self, when: float, request: str, served, x: np.ndarray, probs: np.ndarray) -> None:
        challenger = self._challenger()
        if challenger is None or challenger.version == served.version:
            return  # nothing to compare: no challenger, or it is the champion itself
        start = time.perf_counter()
        try:
            failpoints.reach("shadow:predict")
            other = challenger.predict(x, False)[0]
            error = False
        except Exception as err:  # noqa: BLE001 - whatever the challenger does, the champion answered
            other, error = np.full_like(probs, np.nan), True
            print(f"[tollgate] shadow: challenger v{challenger.version} failed: {err}", flush=True)
        latency_ms = (time.perf_counter() - start) * 1000
        self.metrics.shadow_latency.observe(latency_ms / 1000)
        # Class names, not indices: the two versions need not list their classes alike.
        pred = [served.meta["classes"][i] for i in probs.argmax(axis=1)]
        theirs = [""] * len(x) if error else [challenger.meta["classes"][i] for i in other.argmax(axis=1)]
        for i in range(len(x)):
            outcome = "error" if error else ("agree" if pred[i] == theirs[i] else "disagree")
            self.metrics.shadow.labels(outcome).inc()
            self._rows.append(
                {
                    "request": request,
                    "item": i,
                    "time": when,
                    "version": served.version,
                    "challenger": challenger.version,
                    "pred": pred[i],
                    "challenger_pred": theirs[i],
                    "confidence": float(probs[i].max()),
                    "challenger_confidence": float("nan") if error else float(other[i].max()),
                    "latency_ms": latency_ms,
                    "error": error,
                }
            )

    def _write(self) -> None:
        rows, self._rows = self._rows, []
        if not rows:
            return
        self._seq += 1
        columns = {k: np.array([r[k] for r in rows]) for k in rows[0]}
        try:
            shards.write_shard(
                self.folder, shards.shard_name(shards.SHADOW, rows[0]["time"], self._seq), columns
            )
        except Exception as err:  # noqa: BLE001 - a full disk or a lost bucket: the champion never notices
            print(f"[tollgate] shadow: cannot write records: {err}", flush=True)
