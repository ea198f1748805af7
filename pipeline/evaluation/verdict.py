"""The gate's verdict: a table of checks with the outcome, as evaluate writes it to reports/gate.json and
register, promote, the flow and the summary read it back."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.core.reports import Report


class Check(Report):
    check: str  # what a person reads in the table
    key: str  # the params.yaml gate key that sets it (what warn_only names)
    value: float | str | None
    threshold: float | str | None
    passed: bool = Field(alias="pass")
    action: Literal["block", "warn"]
    detail: str = ""
    op: Literal[">=", "<="] = Field(">=", exclude=True)  # how value must relate to threshold

    def reason(self) -> str:
        if isinstance(self.value, float) and isinstance(self.threshold, float):
            broken = {">=": "<", "<=": ">"}[self.op]
            return f"{self.check} {self.value:.4f} {broken} {self.threshold:.4f}"
        return f"{self.check}: {self.detail}"


class Paired(Report):
    """The candidate and the champion on the same test images: how many each gets right that the other
    misses, and the one-sided exact McNemar test of "the candidate is worse" on those discordant pairs."""

    champion: str  # its version
    better: int  # images the candidate gets right and the champion misses
    worse: int  # images the champion gets right and the candidate misses
    images: int
    p_value: float  # P(candidate wins <= `better` of the `better + worse` discordant pairs | no difference)
    significance: float  # gate.significance
    max_drop: float  # gate.max_drop, what a drop within noise is then held to

    @property
    def significantly_worse(self) -> bool:
        return self.worse > self.better and self.p_value < self.significance

    def sentence(self) -> str:
        counts = f"worse on {self.worse} images, better on {self.better} of {self.images}"
        p = f"p = {self.p_value:.3g}"
        if self.significantly_worse:
            return f"{counts}: significantly worse ({p} < gate.significance {self.significance:g}): refused"
        if self.worse > self.better:
            return f"{counts}: a drop within noise ({p}): allowed by gate.max_drop {self.max_drop:g}"
        return f"{counts}: not worse ({p})"


class Verdict(Report):
    passed: bool
    checks: list[Check]
    reasons: list[str]  # the blocking checks that failed
    warnings: list[str]  # the warn-only checks that failed
    run_id: str | None = None  # the candidate's training run
    champion_version: str | None = None  # the champion it was compared with (None: there was none)
    data_version: str | None = None
    paired: Paired | None = None  # the paired comparison with the champion, when there was one

    @classmethod
    def of(cls, checks: list[Check], paired: Paired | None = None) -> Verdict:
        blocking = [c for c in checks if not c.passed and c.action == "block"]
        return cls(
            passed=not blocking,
            checks=checks,
            reasons=[c.reason() for c in blocking],
            warnings=[c.reason() for c in checks if not c.passed and c.action == "warn"],
            paired=paired,
        )

    def summary(self) -> str:
        """The verdict in a few words, for a tag: `passed`, `passed (warned: ...)` or `failed: <checks>`."""
        failed = [c.check for c in self.checks if not c.passed]
        blocking = [c.check for c in self.checks if not c.passed and c.action == "block"]
        if blocking:
            return "failed: " + ", ".join(blocking)
        return "passed" + (f" (warned: {', '.join(failed)})" if failed else "")

    def headline(self) -> str:
        return "PASSED" if self.passed else "FAILED: " + "; ".join(self.reasons)

    def markdown(self) -> str:
        """The verdict as a markdown table, for the MLflow run and version and the Prefect UI."""
        lines = [
            f"## Gate: {'PASSED' if self.passed else 'FAILED'}",
            "",
            "| check | value | threshold | result | action | note |",
            "|---|---|---|---|---|---|",
        ]
        for c in self.checks:
            result = "pass" if c.passed else "**FAIL**"
            lines.append(
                f"| {c.check} | {fmt(c.value)} | {fmt(c.threshold)} | {result} | {c.action} | {c.detail} |"
            )
        if self.reasons:
            lines += ["", "Blocked by: " + "; ".join(self.reasons)]
        if self.warnings:
            lines += ["", "Warnings: " + "; ".join(self.warnings)]
        return "\n".join(lines) + "\n"


def fmt(v: object) -> str:
    """A table cell: four decimals for figures, '-' for nothing."""
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))
