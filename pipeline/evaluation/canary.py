"""The analysis of one canary step: the candidate (@canary) against the champion over the same window of
live traffic, on serving health and on what users say is right.

Three kinds of check, each named in the verdict with its figures:

- thresholds (Flagger's `thresholdRange`): the candidate's error share and p99 latency;
- rank tests (Kayenta's Mann-Whitney U per metric): is the candidate's latency stochastically larger, or
  its confidence smaller, than the champion's? A rank test on thousands of requests finds shifts too small
  to matter, so a check fails only when it is significant *and* the effect (P(candidate worse) from U) is
  above 0.5 + `rank_effect`;
- the label test: with `/feedback` labels on at least `min_labels` requests of each variant, Fisher's
  exact test of "the candidate is less often right than the champion" on those requests.

Why a Bonferroni-spent alpha, not an always-valid (mSPRT) test: a rollout looks exactly once per step, at
its end, on that step's own requests, and the number of looks is known in advance (`len(steps)`). Giving
each of the 3 tests at each look alpha / (3 * len(steps)) bounds the chance that a candidate as good as the
champion is rolled back anywhere in the rollout by `alpha` (the union bound), with exact small-sample
tests and no mixing distribution to tune; an mSPRT would be the choice for looking continuously, which
the step structure makes unnecessary. tests/model/test_canary_analysis.py simulates hundreds of rollouts of
equal models to check the bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.core.config import CanaryConfig

CHAMPION, CANARY = "champion", "canary"
TESTS_PER_LOOK = 3  # latency rank, confidence rank, labels: the thresholds are not tests of chance


@dataclass
class Variant:
    """What one variant answered in a window: per request, latency, top confidence, error; and how many of
    its labelled requests it got right."""

    latencies_ms: list[float] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    errors: int = 0
    labelled: int = 0
    correct: int = 0

    @property
    def requests(self) -> int:
        return len(self.latencies_ms) + self.errors

    def add(self, row: dict) -> None:
        """One answered request as `/admin/canary/window` lists it."""
        if row["error"]:
            self.errors += 1
            return
        self.latencies_ms.append(row["latency_ms"])
        self.confidences.append(row["confidence"])
        if row.get("correct") is not None:
            self.labelled += 1
            self.correct += bool(row["correct"])


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    statistic: float | None = None
    p: float | None = None


@dataclass(frozen=True)
class Verdict:
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def reason(self) -> str:
        return "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.passed)

    def table(self) -> list[dict]:
        """Plain JSON values (numpy's bools and floats are not): the report and the flow's artifacts."""
        return [
            {
                "check": c.name,
                "passed": bool(c.passed),
                "detail": c.detail,
                "statistic": None if c.statistic is None else float(c.statistic),
                "p": None if c.p is None else float(c.p),
            }
            for c in self.checks
        ]


def window(rows: list[dict]) -> dict[str, Variant]:
    """The rows of a window split by variant."""
    out = {CHAMPION: Variant(), CANARY: Variant()}
    for row in rows:
        out[row["variant"]].add(row)
    return out


def step_alpha(cfg: CanaryConfig) -> float:
    return cfg.alpha / (TESTS_PER_LOOK * len(cfg.steps))


def _thresholds(canary: Variant, cfg: CanaryConfig) -> list[Check]:
    rate = canary.errors / canary.requests if canary.requests else 0.0
    p99 = float(np.percentile(canary.latencies_ms, 99)) if canary.latencies_ms else 0.0
    return [
        Check(
            "error rate",
            rate <= cfg.max_error_rate,
            f"{rate:.2%} of {canary.requests} requests failed (max {cfg.max_error_rate:.2%})",
            rate,
        ),
        Check("p99 latency", p99 <= cfg.max_p99_ms, f"{p99:.1f} ms (max {cfg.max_p99_ms:g} ms)", p99),
    ]


def _rank(name: str, worse: list[float], better: list[float], cfg: CanaryConfig, unit: str) -> Check:
    """Mann-Whitney U, one-sided: are `worse`'s values stochastically larger than `better`'s?"""
    from scipy.stats import mannwhitneyu

    if len(worse) < 2 or len(better) < 2:
        return Check(name, True, "too few answers to compare")
    u, p = mannwhitneyu(worse, better, alternative="greater")
    effect = float(u) / (len(worse) * len(better))  # P(a canary value is the worse one), ties half
    alpha, bound = step_alpha(cfg), 0.5 + cfg.rank_effect
    failed = p < alpha and effect > bound
    detail = f"U={u:.0f}, p={p:.2g} (alpha {alpha:.2g}), P(canary {unit})={effect:.2f} (max {bound:.2f})"
    return Check(name, not failed, detail, float(u), float(p))


def _labels(champion: Variant, canary: Variant, cfg: CanaryConfig) -> Check:
    from scipy.stats import fisher_exact

    name = "label accuracy"
    if min(champion.labelled, canary.labelled) < cfg.min_labels:
        seen = f"{canary.labelled} canary / {champion.labelled} champion"
        return Check(name, True, f"{seen} labelled requests, {cfg.min_labels} each needed: not judged")
    table = [
        [canary.correct, canary.labelled - canary.correct],
        [champion.correct, champion.labelled - champion.correct],
    ]
    odds, p = fisher_exact(table, alternative="less")
    alpha = step_alpha(cfg)
    detail = (
        f"canary {canary.correct}/{canary.labelled} right, champion {champion.correct}/{champion.labelled}; "
        f"Fisher p={p:.2g} (alpha {alpha:.2g})"
    )
    return Check(name, p >= alpha, detail, float(odds), float(p))


def _negated(variant: Variant) -> list[float]:
    return [-c for c in variant.confidences]


def analyse(variants: dict[str, Variant], cfg: CanaryConfig) -> Verdict:
    """The verdict on one step's window. Comparisons need a baseline: at 100 % the champion answers
    nothing, and only the thresholds judge."""
    champion, canary = variants[CHAMPION], variants[CANARY]
    checks = _thresholds(canary, cfg)
    if champion.requests:
        checks += [
            _rank("latency rank", canary.latencies_ms, champion.latencies_ms, cfg, "slower"),
            # less confident = larger negated confidence
            _rank("confidence rank", _negated(canary), _negated(champion), cfg, "less confident"),
            _labels(champion, canary, cfg),
        ]
    return Verdict(checks)
