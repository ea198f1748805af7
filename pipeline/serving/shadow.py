"""The shadow challenger (`serve.shadow`): `@challenger` runs on the sampled requests on a thread of its
own, after their responses are computed, and what it would have answered is recorded beside what the
champion did: agreement, both confidences, its latency. A challenger that raises, sleeps or cannot be
loaded never touches a response: its queue is bounded (a full one drops and counts), its errors are
counted, and the champion's path does not wait on it.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np

from pipeline import failpoints, live
from pipeline.serving.batching import ModelSlot, NoModel
from pipeline.serving.metrics import Metrics
from pipeline.tracking import CHALLENGER

_STOP = object()


class Shadow:
    def __init__(self, slot: ModelSlot, size: int, folder: Path, flush_s: float, metrics: Metrics):
        self.slot = slot
        self.folder = folder
        self.flush_s = flush_s
        self.metrics = metrics
        self.queue: queue.Queue = queue.Queue(maxsize=size)
        self.checked = 0.0
        self._rows: list[dict] = []
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()

    def offer(self, request: str, served, x: np.ndarray, probs: np.ndarray) -> None:
        try:
            self.queue.put_nowait((time.time(), request, served, x, probs))
        except queue.Full:
            self.metrics.shadow.labels("dropped").inc(len(x))

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

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
            try:
                item = self.queue.get(timeout=self.flush_s)
            except queue.Empty:
                item = None
            if item is _STOP:
                self._write()
                return
            if item is not None:
                self._score(*item)
            if self._rows and time.time() - last_write >= self.flush_s:
                self._write()
                last_write = time.time()

    def _score(self, when: float, request: str, served, x: np.ndarray, probs: np.ndarray) -> None:
        from pipeline.model import predict_proba

        challenger = self._challenger()
        if challenger is None or challenger.version == served.version:
            return  # nothing to compare: no challenger, or it is the champion itself
        start = time.perf_counter()
        try:
            failpoints.reach("shadow:predict")
            other = predict_proba(challenger.model, x).numpy()
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
            live.write_shard(live.shard_path(self.folder, live.SHADOW, rows[0]["time"], self._seq), columns)
        except OSError as err:
            print(f"[tollgate] shadow: cannot write records: {err}", flush=True)
