"""The offline gate, at evaluate: absolute bounds on the candidate's test metrics, speed and size, then
"not worse than the @champion re-scored now on the same test split" (within `gate.max_drop`, and never
significantly worse on the same images), and on the recent-feedback slice when there is one (the online
gate, at promote, is `pipeline.evaluation.online`). The verdict is data (`pipeline.evaluation.verdict`),
never an exception: the evaluate stage always succeeds, and register and promote read it.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.config import GateConfig
from pipeline.evaluation.champion import Champion
from pipeline.evaluation.verdict import Check, Paired, Verdict


class _Checks:
    """Builds the rows of one verdict: each check's action (block or warn) comes from `gate.warn_only`."""

    def __init__(self, cfg: GateConfig):
        self.cfg = cfg
        self.rows: list[Check] = []

    def action(self, key: str) -> str:
        return "warn" if key in self.cfg.warn_only else "block"

    def add(
        self, name: str, key: str, value, threshold, passed: bool, detail: str = "", op: str = ">="
    ) -> None:
        self.rows.append(
            Check(
                check=name,
                key=key,
                value=value,
                threshold=threshold,
                passed=passed,
                action=self.action(key),
                detail=detail,
                op=op,
            )
        )

    def at_least(self, name: str, key: str, value: float, floor: float, detail: str = "") -> None:
        self.add(name, key, value, floor, value >= floor, detail, ">=")

    def at_most(self, name: str, key: str, value: float, ceiling: float, detail: str = "") -> None:
        self.add(name, key, value, ceiling, value <= ceiling, detail, "<=")


def _absolute(c: _Checks, candidate: dict) -> None:
    cfg = c.cfg
    recall = candidate["per_class_recall"]
    worst = min(recall, key=recall.get)
    c.at_least("accuracy", "min_accuracy", candidate["accuracy"], cfg.min_accuracy)
    c.at_least("macro_f1", "min_macro_f1", candidate["macro_f1"], cfg.min_macro_f1)
    c.at_least(
        "min class recall", "min_class_recall", recall[worst], cfg.min_class_recall, f"worst class: {worst}"
    )
    c.at_most("ece", "max_ece", candidate["ece"], cfg.max_ece)
    c.at_most(
        "p99 latency ms",
        "max_p99_latency_ms",
        candidate["latency_p99_ms"],
        cfg.max_p99_latency_ms,
        "batch 1 on the evaluating device",
    )
    c.at_most("model size MB", "max_model_mb", candidate["model_mb"], cfg.max_model_mb)
    if "shift_stability" in candidate:
        c.at_least(
            "shift stability", "min_shift_stability", candidate["shift_stability"], cfg.min_shift_stability
        )


def _against_champion(c: _Checks, candidate: dict, classes: list[str], champion: Champion | None) -> None:
    cfg = c.cfg
    if champion is None:
        c.add(
            "vs champion",
            "max_drop",
            None,
            None,
            True,
            "no @champion yet: first model, absolute bounds alone decide",
        )
    elif champion.error:
        c.add(
            "champion loads",
            "max_drop",
            None,
            f"v{champion.version}",
            False,
            f"@champion v{champion.version} could not be loaded ({champion.error}): "
            "roll back to a version that loads (tollgate rollback --to N)",
        )
    elif champion.metrics is None or champion.classes != classes:
        c.add(
            "same classes as champion",
            "max_drop",
            ",".join(classes),
            ",".join(champion.classes),
            False,
            f"champion v{champion.version} was trained on other classes or image shapes: "
            "compare by hand and promote explicitly",
        )
    else:
        for metric in cfg.compare_metrics:
            best = champion.metrics[metric]
            floor = best - cfg.max_drop if cfg.drop_mode == "absolute" else best * (1 - cfg.max_drop)
            c.at_least(
                f"{metric} vs champion v{champion.version}",
                "max_drop",
                candidate[metric],
                round(floor, 6),
                f"champion re-scored now: {best:.4f}, allowed {cfg.drop_mode} drop {cfg.max_drop}",
            )


def paired(correct: np.ndarray, champion: Champion, cfg: GateConfig) -> Paired:
    """The candidate's and the champion's answers on the same test images (`correct`: the candidate's,
    per image), compared where they disagree: a one-sided exact McNemar (binomial) test that the candidate
    is worse. The images both get right or both miss say nothing about which is better."""
    # scipy.stats.binomtest(alternative="less") is this binomial CDF; importing scipy.stats costs evaluate
    # 1.2-1.9 s, scipy.special a quarter of that
    from scipy.special import bdtr

    better = int((correct & ~champion.correct).sum())
    worse = int((~correct & champion.correct).sum())
    p = bdtr(better, better + worse, 0.5) if better + worse else 1.0
    return Paired(
        champion=champion.version,
        better=better,
        worse=worse,
        images=len(correct),
        p_value=round(float(p), 6),
        significance=cfg.significance,
        max_drop=cfg.max_drop,
    )


def _paired_check(c: _Checks, result: Paired) -> None:
    c.add(
        f"paired vs champion v{result.champion}",
        "significance",
        result.p_value,
        c.cfg.significance,
        not result.significantly_worse,
        result.sentence(),
    )


def _feedback(c: _Checks, candidate: dict, champion: Champion | None) -> None:
    """The recent-feedback slice: the candidate may trail the champion there by `gate.max_feedback_drop`
    (what users labelled lately is what the frozen test set may not show)."""
    value, n = candidate["feedback_accuracy"], candidate["feedback_images"]
    theirs = ((champion.metrics if champion else None) or {}).get("feedback_accuracy")
    if theirs is None:
        c.add("feedback slice accuracy", "max_feedback_drop", value, None, True,
              f"{n} recent feedback images; no champion scored on them")  # fmt: skip
        return
    c.at_least(
        f"feedback slice accuracy vs champion v{champion.version}",
        "max_feedback_drop",
        value,
        round(theirs - c.cfg.max_feedback_drop, 6),
        f"{n} recent feedback images; champion {theirs:.4f}, allowed drop {c.cfg.max_feedback_drop}",
    )


def gate(
    candidate: dict,
    classes: list[str],
    cfg: GateConfig,
    champion: Champion | None,
    correct: np.ndarray | None = None,
) -> Verdict:
    """Judge the candidate's metrics against absolute bounds and, when a champion exists, against the
    champion re-scored on the same test split: by how much its metrics trail (`gate.max_drop`) and, with
    `correct` (the candidate's answer per test image right or wrong), whether it is significantly worse on
    the same images (`gate.significance`), which no `max_drop` allows."""
    checks = _Checks(cfg)
    _absolute(checks, candidate)
    _against_champion(checks, candidate, classes, champion)
    compared = None
    if (
        correct is not None
        and champion is not None
        and champion.correct is not None
        and champion.classes == classes
    ):
        compared = paired(correct, champion, cfg)
        _paired_check(checks, compared)
    if "feedback_accuracy" in candidate:
        _feedback(checks, candidate, champion)
    return Verdict.of(checks.rows, compared)
