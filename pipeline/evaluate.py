"""evaluate: test-split metrics, behavioural checks, speed and size, the @champion re-scored now on the same
split, and the gate.

The gate's verdict is data (a table of checks), never an exception: the evaluate stage always succeeds,
and register/promote read the verdict.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import EvaluateConfig, GateConfig
from pipeline.data import Dataset

if TYPE_CHECKING:
    from pipeline.tracking import Store


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
    its predicted classes for `x`."""
    probs = probs_of(x)
    pred = probs.argmax(1)
    quality = quality_metrics(probs, y, classes, cfg)
    quality.update(stability_metrics(lambda z: probs_of(z).argmax(1), x, pred, cfg))
    return quality, pred


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


def speed_metrics(forward, shape: list[int], cfg: EvaluateConfig) -> dict:
    """Batch-1 latency percentiles and batched throughput of `forward` (pixels -> anything) on its device."""
    one = np.zeros((1, *shape), dtype=np.float32)
    batch = np.zeros((cfg.throughput_batch, *shape), dtype=np.float32)
    for _ in range(3):  # warm-up: allocator, kernels and caches
        forward(one)
    lat = []
    for _ in range(cfg.timing_runs):
        start = time.perf_counter()
        forward(one)
        lat.append((time.perf_counter() - start) * 1000)
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


@dataclass(frozen=True)
class Check:
    name: str
    key: str  # the params.yaml gate key that sets it (what warn_only names)
    value: float | str | None
    threshold: float | str | None
    passed: bool
    action: str  # block | warn
    detail: str = ""
    op: str = ">="  # how value must relate to threshold

    def as_dict(self) -> dict:
        return {
            "check": self.name,
            "key": self.key,
            "value": self.value,
            "threshold": self.threshold,
            "pass": self.passed,
            "action": self.action,
            "detail": self.detail,
        }


def slice_accuracy(probs_of, data: Dataset) -> float:
    """Share of `data` a model (`probs_of`: pixels -> class probabilities) gets right."""
    return float((probs_of(data.x).argmax(axis=1) == data.y).mean())


def champion_scores(
    store: Store, name: str, test: Dataset, cfg: EvaluateConfig, feedback: Dataset | None = None
) -> dict | None:
    """The current @champion, loaded from the registry and scored now on this test split (and on the
    feedback slice, as `feedback_accuracy`), as the gate takes it: {"version", "classes", "metrics"}
    (metrics None when it cannot be scored on this data, with "error" when it cannot even be loaded), or
    None when there is no champion."""
    from pipeline.model import predict_proba
    from pipeline.tracking import CHAMPION

    ref = store.version(name, CHAMPION)
    if ref is None:
        return None
    try:
        model, meta = store.load_model(ref.uri)
    except Exception as err:  # noqa: BLE001 - the gate reports it; nothing gets compared with a guess
        return {
            "version": ref.version,
            "classes": None,
            "metrics": None,
            "error": f"{type(err).__name__}: {err}",
        }
    champion = {"version": ref.version, "classes": meta["classes"], "metrics": None}
    if meta["classes"] == test.classes and list(meta["input_shape"]) == list(test.x.shape[1:]):
        probs = predict_proba(model, test.x).numpy()
        champion["metrics"] = quality_metrics(probs, test.y, test.classes, cfg)
        if feedback is not None:
            champion["metrics"]["feedback_accuracy"] = slice_accuracy(
                lambda x: predict_proba(model, x).numpy(), feedback
            )
    return champion


def feedback_check(candidate: dict, champion: dict | None, cfg: GateConfig, action: str) -> Check:
    """The recent-feedback slice: the candidate may trail the champion there by `gate.max_feedback_drop`
    (what users labelled lately is what the frozen test set may not show)."""
    value, n = candidate["feedback_accuracy"], candidate["feedback_images"]
    theirs = ((champion or {}).get("metrics") or {}).get("feedback_accuracy")
    if theirs is None:
        return Check("feedback slice accuracy", "max_feedback_drop", value, None, True, action,
                     f"{n} recent feedback images; no champion scored on them")  # fmt: skip
    floor = round(theirs - cfg.max_feedback_drop, 6)
    return Check(
        f"feedback slice accuracy vs champion v{champion['version']}",
        "max_feedback_drop",
        value,
        floor,
        value >= floor,
        action,
        f"{n} recent feedback images; champion {theirs:.4f}, allowed drop {cfg.max_feedback_drop}",
    )


def gate(candidate: dict, classes: list[str], cfg: GateConfig, champion: dict | None) -> dict:
    """Judge the candidate's metrics against absolute bounds and, when a champion exists, against the
    champion re-scored on the same test split. `champion` is {"version", "classes", "metrics"} or None
    (metrics None when it cannot be scored on this data)."""

    def action(key: str) -> str:
        return "warn" if key in cfg.warn_only else "block"

    def at_least(name: str, key: str, value: float, floor: float, detail: str = "") -> Check:
        return Check(name, key, value, floor, value >= floor, action(key), detail, ">=")

    def at_most(name: str, key: str, value: float, ceiling: float, detail: str = "") -> Check:
        return Check(name, key, value, ceiling, value <= ceiling, action(key), detail, "<=")

    recall = candidate["per_class_recall"]
    worst = min(recall, key=recall.get)
    checks = [
        at_least("accuracy", "min_accuracy", candidate["accuracy"], cfg.min_accuracy),
        at_least("macro_f1", "min_macro_f1", candidate["macro_f1"], cfg.min_macro_f1),
        at_least(
            "min class recall",
            "min_class_recall",
            recall[worst],
            cfg.min_class_recall,
            f"worst class: {worst}",
        ),
        at_most("ece", "max_ece", candidate["ece"], cfg.max_ece),
        at_most(
            "p99 latency ms",
            "max_p99_latency_ms",
            candidate["latency_p99_ms"],
            cfg.max_p99_latency_ms,
            "batch 1 on the evaluating device",
        ),
        at_most("model size MB", "max_model_mb", candidate["model_mb"], cfg.max_model_mb),
    ]
    if "shift_stability" in candidate:
        checks.append(
            at_least(
                "shift stability",
                "min_shift_stability",
                candidate["shift_stability"],
                cfg.min_shift_stability,
            )
        )
    if champion is None:
        checks.append(
            Check(
                "vs champion",
                "max_drop",
                None,
                None,
                True,
                action("max_drop"),
                "no @champion yet: first model, absolute bounds alone decide",
            )
        )
    elif champion.get("error"):
        checks.append(
            Check(
                "champion loads",
                "max_drop",
                None,
                f"v{champion['version']}",
                False,
                action("max_drop"),
                f"@champion v{champion['version']} could not be loaded ({champion['error']}): "
                "roll back to a version that loads (tollgate rollback --to N)",
            )
        )
    elif champion["metrics"] is None or champion["classes"] != classes:
        checks.append(
            Check(
                "same classes as champion",
                "max_drop",
                ",".join(classes),
                ",".join(champion["classes"]),
                False,
                action("max_drop"),
                f"champion v{champion['version']} was trained on other classes or image shapes: "
                "compare by hand and promote explicitly",
            )
        )
    else:
        for metric in cfg.compare_metrics:
            best = champion["metrics"][metric]
            floor = best - cfg.max_drop if cfg.drop_mode == "absolute" else best * (1 - cfg.max_drop)
            checks.append(
                at_least(
                    f"{metric} vs champion v{champion['version']}",
                    "max_drop",
                    candidate[metric],
                    round(floor, 6),
                    f"champion re-scored now: {best:.4f}, allowed {cfg.drop_mode} drop {cfg.max_drop}",
                )
            )
    if "feedback_accuracy" in candidate:
        checks.append(feedback_check(candidate, champion, cfg, action("max_feedback_drop")))
    blocking = [c for c in checks if not c.passed and c.action == "block"]
    return {
        "passed": not blocking,
        "checks": [c.as_dict() for c in checks],
        "reasons": [_reason(c) for c in blocking],
        "warnings": [_reason(c) for c in checks if not c.passed and c.action == "warn"],
    }


def _reason(c: Check) -> str:
    if isinstance(c.value, float) and isinstance(c.threshold, float):
        broken = {">=": "<", "<=": ">"}[c.op]
        return f"{c.name} {c.value:.4f} {broken} {c.threshold:.4f}"
    return f"{c.name}: {c.detail}"


def gate_summary(verdict: dict) -> str:
    """The verdict in a few words, for a tag: `passed`, `passed (warned: ...)` or `failed: <checks>`."""
    failed = [c["check"] for c in verdict["checks"] if not c["pass"]]
    blocking = [c["check"] for c in verdict["checks"] if not c["pass"] and c["action"] == "block"]
    if blocking:
        return "failed: " + ", ".join(blocking)
    return "passed" + (f" (warned: {', '.join(failed)})" if failed else "")


def confusion_figure(cm: np.ndarray, classes: list[str]):
    """The confusion matrix as a matplotlib figure (rows actual, columns predicted)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(classes), 1 + 0.5 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="actual",
        title="confusion matrix (test)",
    )
    for (i, j), n in np.ndenumerate(cm):
        ax.text(
            j, i, str(n), ha="center", va="center", fontsize=7, color="white" if n > cm.max() / 2 else "black"
        )
    fig.tight_layout()
    return fig


def gate_markdown(verdict: dict) -> str:
    """The verdict as a markdown table, for the MLflow run and the Prefect UI."""

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))

    lines = [
        f"## Gate: {'PASSED' if verdict['passed'] else 'FAILED'}",
        "",
        "| check | value | threshold | result | action | note |",
        "|---|---|---|---|---|---|",
    ]
    for c in verdict["checks"]:
        result = "pass" if c["pass"] else "**FAIL**"
        lines.append(
            f"| {c['check']} | {fmt(c['value'])} | {fmt(c['threshold'])} | {result} | {c['action']} "
            f"| {c['detail']} |"
        )
    if verdict["reasons"]:
        lines += ["", "Blocked by: " + "; ".join(verdict["reasons"])]
    if verdict["warnings"]:
        lines += ["", "Warnings: " + "; ".join(verdict["warnings"])]
    return "\n".join(lines) + "\n"
