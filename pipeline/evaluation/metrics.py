"""What a model does on labelled images: classification metrics, calibration, behavioural stability under
small perturbations, and speed. Every function takes the model as `probs_of` (pixels -> class
probabilities), so the candidate and the champion are measured by the same code.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.core.config import EvaluateConfig
from pipeline.data.prepared import Dataset


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    cm = confusion_matrix(y_true, y_pred, len(classes))
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / max(len(y_true), 1)),
        "macro_f1": float(f1.mean()),
        "per_class_precision": {c: float(p) for c, p in zip(classes, precision, strict=True)},
        "per_class_recall": {c: float(r) for c, r in zip(classes, recall, strict=True)},
        "n_test": int(len(y_true)),
    }


def top_k_accuracy(probs: np.ndarray, y: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Images moved by (dy, dx) pixels, uncovered border filled with zeros (NHWC)."""
    out = np.zeros_like(x)
    h, w = x.shape[1:3]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def quality_metrics(probs: np.ndarray, y: np.ndarray, classes: list[str], cfg: EvaluateConfig) -> dict:
    pred = probs.argmax(axis=1)
    return {
        **classification_metrics(y, pred, classes),
        f"top_{cfg.top_k}_accuracy": top_k_accuracy(probs, y, cfg.top_k),
        "ece": expected_calibration_error(probs, y, cfg.ece_bins),
    }


def assess(
    probs_of, x: np.ndarray, y: np.ndarray, classes: list[str], cfg: EvaluateConfig
) -> tuple[dict, np.ndarray]:
    """Quality and behavioural metrics of a model given as `probs_of` (pixels -> class probabilities), and
    its class probabilities for `x`."""
    probs = probs_of(x)
    quality = quality_metrics(probs, y, classes, cfg)
    quality.update(stability_metrics(lambda z: probs_of(z).argmax(1), x, probs.argmax(1), cfg))
    return quality, probs


def stability_metrics(predict, x: np.ndarray, pred: np.ndarray, cfg: EvaluateConfig) -> dict:
    """Share of predictions unchanged under small perturbations; `predict` maps pixels to class ids."""
    out = {}
    if cfg.shift_pixels:
        s = cfg.shift_pixels
        moves = [(s, 0), (-s, 0), (0, s), (0, -s)]
        out["shift_stability"] = float(
            np.mean([(predict(shifted(x, dy, dx)) == pred).mean() for dy, dx in moves])
        )
    if cfg.check_flips:
        out["flip_stability"] = float((predict(np.ascontiguousarray(x[:, :, ::-1])) == pred).mean())
    return out


def batch1_latencies_ms(forward, shape: list[int], runs: int, dtype=np.float32) -> list[float]:
    """`runs` timed calls of `forward` on one image of `shape`, after a warm-up (allocator, kernels and
    caches)."""
    one = np.zeros((1, *shape), dtype=dtype)
    for _ in range(3):
        forward(one)
    lat = []
    for _ in range(runs):
        start = time.perf_counter()
        forward(one)
        lat.append((time.perf_counter() - start) * 1000)
    return lat


def speed_metrics(forward, shape: list[int], cfg: EvaluateConfig) -> dict:
    """Batch-1 latency percentiles and batched throughput of `forward` (pixels -> anything) on its device."""
    lat = batch1_latencies_ms(forward, shape, cfg.timing_runs)
    batch = np.zeros((cfg.throughput_batch, *shape), dtype=np.float32)
    forward(batch)
    start = time.perf_counter()
    runs = max(1, cfg.timing_runs // 10)
    for _ in range(runs):
        forward(batch)
    elapsed = time.perf_counter() - start
    return {
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p99_ms": float(np.percentile(lat, 99)),
        "throughput_ips": float(runs * cfg.throughput_batch / elapsed),
        "throughput_batch": cfg.throughput_batch,
    }


def slice_accuracy(probs_of, data: Dataset) -> float:
    """Share of `data` a model (`probs_of`: pixels -> class probabilities) gets right."""
    return float((probs_of(data.x).argmax(axis=1) == data.y).mean())
