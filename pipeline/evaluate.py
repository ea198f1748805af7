"""evaluate: test-split metrics and the gate.

The gate's verdict is data (a table of checks), never an exception: the evaluate stage always succeeds,
and register/promote read the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import EvaluateConfig


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
        "per_class_recall": {c: float(r) for c, r in zip(classes, recall, strict=True)},
        "n_test": int(len(y_true)),
    }


@dataclass(frozen=True)
class Check:
    name: str
    value: float | str | None
    threshold: float | str | None
    passed: bool
    detail: str = ""

    def as_dict(self) -> dict:
        return {
            "check": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "pass": self.passed,
            "detail": self.detail,
        }


def gate(candidate: dict, classes: list[str], cfg: EvaluateConfig, champion: dict | None) -> dict:
    """Checks the candidate's metrics against absolute bounds and, when a champion exists, against the
    champion re-scored on the same test split. `champion` is {"version", "classes", "metrics"} or None."""
    checks = [
        Check("accuracy", candidate["accuracy"], cfg.min_accuracy, candidate["accuracy"] >= cfg.min_accuracy),
        Check("macro_f1", candidate["macro_f1"], cfg.min_macro_f1, candidate["macro_f1"] >= cfg.min_macro_f1),
    ]
    if champion is None:
        checks.append(
            Check("vs champion", None, None, True, "no @champion yet: absolute bounds alone decide")
        )
    elif champion["classes"] != classes:
        checks.append(
            Check(
                "same classes as champion",
                ",".join(classes),
                ",".join(champion["classes"]),
                False,
                f"champion v{champion['version']} was trained on other classes or image shapes: "
                "compare by hand and promote explicitly",
            )
        )
    else:
        for metric in cfg.compare_metrics:
            floor = champion["metrics"][metric] - cfg.max_drop
            checks.append(
                Check(
                    f"{metric} vs champion v{champion['version']}",
                    candidate[metric],
                    round(floor, 6),
                    candidate[metric] >= floor,
                    f"champion re-scored now: {champion['metrics'][metric]:.4f}, allowed drop {cfg.max_drop}",
                )
            )
    failed = [c for c in checks if not c.passed]
    return {
        "passed": not failed,
        "checks": [c.as_dict() for c in checks],
        "reasons": [_reason(c) for c in failed],
    }


def _reason(c: Check) -> str:
    if isinstance(c.value, float) and isinstance(c.threshold, float):
        return f"{c.name} {c.value:.4f} < {c.threshold:.4f}"
    return f"{c.name}: {c.detail}"
