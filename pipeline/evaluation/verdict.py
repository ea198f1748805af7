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


class Verdict(Report):
    passed: bool
    checks: list[Check]
    reasons: list[str]  # the blocking checks that failed
    warnings: list[str]  # the warn-only checks that failed
    run_id: str | None = None  # the candidate's training run
    champion_version: str | None = None  # the champion it was compared with (None: there was none)
    data_version: str | None = None

    @classmethod
    def of(cls, checks: list[Check]) -> Verdict:
        blocking = [c for c in checks if not c.passed and c.action == "block"]
        return cls(
            passed=not blocking,
            checks=checks,
            reasons=[c.reason() for c in blocking],
            warnings=[c.reason() for c in checks if not c.passed and c.action == "warn"],
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
