"""Live sampling off the request path: a request picked with probability `monitor.sample_fraction` hands
its model input, prediction and embeddings to a bounded queue (never waiting: when the queue is full the
sample is dropped and counted), and one writer thread turns the queue into shards
(pipeline/data/shards.py), applies the size bound and retention, keeps the rolling drift figures of
`/metrics` current, and remembers where each sampled request went so that `POST /feedback` can find its
input (in this server's memory, else in the shared folder, where any replica may have sampled it). A
request id need not be unique (clients retry with theirs): every sample taken is written or counted as
dropped, and feedback labels the newest sample of an id.
"""

from __future__ import annotations

import collections
import random
import threading
import time

import numpy as np

from pipeline.core import failpoints
from pipeline.core.config import MonitorConfig
from pipeline.data import shards
from pipeline.monitoring import drift
from pipeline.serving.prometheus import Metrics
from pipeline.serving.worker import STOP, Worker

# Request ids remembered for feedback; older ones are answered 404 (their samples are usually gone too).
REMEMBERED = 200_000


class Sampler(Worker):
    def __init__(self, cfg: MonitorConfig, folder: shards.Folder, metrics: Metrics):
        super().__init__(cfg.queue_size, "sampler")
        self.cfg = cfg
        self.folder = folder
        self.metrics = metrics
        self._lock = threading.Lock()
        self._pending: list[tuple] = []  # samples taken, until written: (when, request, version, x, ...)
        self._pending_rows = 0  # images in _pending: checked after every request, so not recounted
        self._newest: dict[str, tuple] = {}  # request id -> its newest pending sample
        self._where: collections.OrderedDict[str, str] = collections.OrderedDict()  # request id -> shard
        self._rolling: collections.deque = collections.deque()  # (version, Window) per request
        self._rolling_rows = 0
        self._since_figures = 0
        self._seq = 0
        self.start()

    def wanted(self) -> bool:
        return self.cfg.sample_fraction > 0 and random.random() < self.cfg.sample_fraction

    def offer(self, request: str, served, x: np.ndarray, probs: np.ndarray, embeddings: np.ndarray) -> None:
        """Hand one request's rows to the writer; costs a queue put, never blocks."""
        if not self.hand((time.time(), request, served, x, probs, embeddings)):
            self.metrics.samples_dropped.inc(len(x))

    def find(self, request: str) -> tuple[str, np.ndarray] | None:
        """(served version, inputs) of the newest sample of a request: pending here, written by this server,
        or written by any server sharing the folder; None if no sample of it is kept."""
        with self._lock:
            rows = self._newest.get(request)
            if rows is not None:
                return rows[2], rows[3]
            name = self._where.get(request)
        names = [name] if name is not None else reversed(shards.shard_names(self.folder, shards.SAMPLES))
        for candidate in names:
            found = _in_shard(self.folder, candidate, request)
            if found is not None:
                return found
        return None

    def _run(self) -> None:
        first = None
        while True:
            wait = self.cfg.flush_s if first is None else max(0.0, first + self.cfg.flush_s - time.time())
            item = self.next(wait)
            if item is STOP:
                self._flush()
                return
            try:
                if item is not None:
                    first = first or item[0]
                    self._take(*item)
                if self._pending and (
                    self._pending_rows >= self.cfg.shard_samples or time.time() - first >= self.cfg.flush_s
                ):
                    self._flush()
                    first = None
            except Exception as err:  # noqa: BLE001 - whatever one sample does, sampling goes on
                with self._lock:
                    lost, self._pending_rows = self._pending_rows, 0
                    self._pending.clear()
                    self._newest.clear()
                self.metrics.samples_dropped.inc(lost)
                first = None
                print(
                    f"[tollgate] live sampling dropped {lost} samples: {type(err).__name__}: {err}",
                    flush=True,
                )

    def _take(self, when: float, request: str, served, x, probs, embeddings) -> None:
        failpoints.reach("sampler:take")
        x = shards.model_input(x)
        pred = probs.argmax(axis=1)
        conf = probs.max(axis=1)
        record = (when, request, served.version, x, pred, conf, embeddings)
        with self._lock:
            self._pending.append(record)
            self._newest[request] = record
            self._pending_rows += len(x)
        self.metrics.samples.inc(len(x))
        if served.reference is not None:
            window = drift.Window(pred, conf, drift.input_stats(x), embeddings)
            self._rolling.append((served.version, window))
            self._rolling_rows += len(x)
            while self._rolling_rows - len(self._rolling[0][1]) >= self.cfg.window:
                self._rolling_rows -= len(self._rolling.popleft()[1])
            self._since_figures += len(x)
            if self._since_figures >= self.cfg.metrics_every:
                self._since_figures = 0
                self._figures(served.version, served.reference)

    def _figures(self, version: str, reference: drift.Reference) -> None:
        """Drift of the newest `monitor.window` samples of the served version, as gauges."""
        parts = [w for v, w in self._rolling if v == version]
        if not parts:
            return
        window = drift.Window(*(np.concatenate(a) for a in zip(*(
            (w.pred, w.confidence, w.inputs, w.embeddings) for w in parts), strict=True)))  # fmt: skip
        result = drift.compare(reference, window.tail(self.cfg.window), self.cfg)
        self.metrics.drift_window.set(result["samples"])
        for name, check in result["checks"].items():
            self.metrics.drift_effect.labels(name).set(check["effect"])
            self.metrics.drift_flag.labels(name).set(1 if check["drift"] else 0)
        for bound in ("estimate", "low", "high") if result.get("accuracy") else ():
            self.metrics.accuracy.labels(bound).set(result["accuracy"][bound])

    def _flush(self) -> None:
        """Write the pending rows, a shard per kind of input and embedding (a new champion may differ)."""
        with self._lock:
            pending = list(self._pending)
        groups: dict[tuple, list] = {}
        for r in pending:
            groups.setdefault((r[3].shape[1:], r[3].dtype.str, r[6].shape[1:]), []).append(r)
        for rows in groups.values():
            self._write(rows)
        shards.enforce_retention(self.folder, self.cfg.max_mb * 1e6, self.cfg.retention_h * 3600)

    def _write(self, rows: list) -> None:
        columns = {
            "x": np.concatenate([r[3] for r in rows]),
            "pred": np.concatenate([r[4] for r in rows]).astype(np.int16),
            "confidence": np.concatenate([r[5] for r in rows]).astype(np.float32),
            "embedding": np.concatenate([r[6] for r in rows]).astype(np.float16),
            "version": np.concatenate([np.full(len(r[3]), r[2]) for r in rows]),
            "request": np.concatenate([np.full(len(r[3]), r[1]) for r in rows]),
            "item": np.concatenate([np.arange(len(r[3]), dtype=np.int32) for r in rows]),
            "time": np.concatenate([np.full(len(r[3]), r[0]) for r in rows]),
        }
        self._seq += 1
        name = shards.shard_name(shards.SAMPLES, rows[0][0], self._seq)
        try:
            shards.write_shard(self.folder, name, columns)
        except Exception as err:  # noqa: BLE001 - a full disk or a lost bucket must not take serving down
            self.metrics.samples_dropped.inc(len(columns["x"]))
            print(f"[tollgate] cannot write live samples to {self.folder.where}/{name}: {err}", flush=True)
            name = None
        written = {id(r) for r in rows}
        with self._lock:
            self._pending = [r for r in self._pending if id(r) not in written]
            self._pending_rows -= len(columns["x"])
            for r in rows:
                if self._newest.get(r[1]) is r:
                    del self._newest[r[1]]
                if name is not None:
                    self._where[r[1]] = name
                    self._where.move_to_end(r[1])
            while len(self._where) > REMEMBERED:
                self._where.popitem(last=False)


def _in_shard(folder: shards.Folder, name: str, request: str) -> tuple[str, np.ndarray] | None:
    """(version, inputs) of the newest sample of `request` in one shard, or None (not there, or the shard
    is gone or damaged)."""
    try:
        shard = shards.read_shard(folder, name)
    except (FileNotFoundError, shards.DamagedShard):
        return None
    keep = shard["request"] == request
    if not keep.any():
        return None
    keep &= shard["time"] == shard["time"][keep].max()  # a reused id: its newest request
    return str(shard["version"][keep][0]), shard["x"][keep][np.argsort(shard["item"][keep])]
