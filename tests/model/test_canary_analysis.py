"""The canary analysis (pipeline/evaluation/canary.py) on simulated windows: candidates as good as the
champion are rolled back no more often than `alpha` over whole rollouts, and worse ones are caught."""

from __future__ import annotations

import json

import numpy as np

from pipeline.evaluation.canary import CANARY, CHAMPION, Variant, analyse
from tests.support import config

CFG = config("promote").canary


def _variant(rng, n: int, accuracy: float, labelled: int, latency_ms: float = 5.0, errors: float = 0.0):
    v = Variant()
    for i in range(n):
        if rng.random() < errors:
            v.add({"error": True})
            continue
        correct = bool(rng.random() < accuracy) if i < labelled else None
        v.add(
            {
                "error": False,
                "latency_ms": float(rng.gamma(4.0, latency_ms / 4.0)),
                "confidence": float(rng.beta(8, 1)),
                "correct": correct,
            }
        )
    return v


def _rollout(rng, canary_accuracy: float = 0.9, **canary) -> str | None:
    """Every step of a rollout on simulated traffic: None when it passes, else the first failure."""
    for weight in CFG.steps:
        n = 400
        champion_n = int(n * (100 - weight) / 100)
        window = {
            CHAMPION: _variant(rng, champion_n, 0.9, champion_n // 2),
            CANARY: _variant(rng, n - champion_n, canary_accuracy, (n - champion_n) // 2, **canary),
        }
        verdict = analyse(window, CFG)
        if not verdict.passed:
            return verdict.reason
    return None


def test_equal_models_are_rolled_back_at_most_alpha_of_the_time():
    rng = np.random.default_rng(0)
    runs = 300
    failed = [r for _ in range(runs) if (r := _rollout(rng)) is not None]
    assert len(failed) / runs <= CFG.alpha, failed


def test_a_less_accurate_candidate_fails_the_label_test_with_its_figures():
    rng = np.random.default_rng(1)
    reason = _rollout(rng, canary_accuracy=0.7)
    assert reason is not None and reason.startswith("label accuracy: canary ")
    assert "Fisher p=" in reason


def test_errors_and_slowness_fail_their_own_checks():
    rng = np.random.default_rng(2)
    assert _rollout(rng, errors=0.05).startswith("error rate: ")
    slow = _rollout(rng, latency_ms=10.0)
    assert slow is not None and "latency rank: U=" in slow


def test_at_full_weight_only_the_thresholds_judge():
    rng = np.random.default_rng(3)
    window = {CHAMPION: Variant(), CANARY: _variant(rng, 300, 0.5, 150)}
    verdict = analyse(window, CFG)
    assert [c["check"] for c in verdict.table()] == ["error rate", "p99 latency"] and verdict.passed
    json.dumps(verdict.table())  # what reports/promotion.json and the flow's artifacts hold
