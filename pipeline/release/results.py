"""What register and promote hand on, as reports/registration.json and reports/promotion.json: read back by
the promote stage, the flow and the summary (which import nothing heavier than this)."""

from __future__ import annotations

from pydantic import Field

from pipeline.core.reports import Report


class Registration(Report):
    """reports/registration.json: the version a passing candidate became, or why it did not."""

    registered: bool
    run_id: str
    name: str | None = None
    version: str | None = None
    model_uri: str | None = None
    alias: str | None = None  # challenger, or exp-<name> for a DVC experiment's candidate
    experiment: str | None = None  # the DVC experiment that made it
    reasons: list[str] = []
    runtime: str = "torch"  # what serves the version: torch, or an ONNX artefact that passed its gate
    runtimes: list[dict] = []  # the artefacts' gate rows (pipeline.evaluation.runtimes.RuntimeRow)
    # Registered by an earlier run of this stage for the same training run: said in the log, never written,
    # so the report of the same version stays byte-identical and promote has nothing to redo.
    existed: bool = Field(False, exclude=True)


class Promotion(Report):
    """reports/promotion.json: where @champion went and who serves it, or why it did not move."""

    promoted: bool
    reason: str | None = None  # why not
    name: str | None = None
    version: str | None = None
    previous: str | None = None
    served_by: str | None = None  # the checkout's server that reloaded it
    summary: str = ""
    replicas: list[str] = []  # the replicas that follow it, verified
    deploy: dict | None = None  # what the target did (Handover.record)
    fenced: dict | None = None  # {"gated_against", "champion"} when the gate compared with another champion
    shadow: dict | None = None  # the shadow report the online gate judged
    experiment: str | None = None  # a DVC experiment's candidate: never promoted by the pipeline
    canary: dict | None = None  # a canary rollout: its steps, each with its analysis, and how it ended

    def line(self) -> str:
        return self.summary if self.promoted else (self.reason or "not promoted")
