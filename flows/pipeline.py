"""The `training-pipeline` Prefect flow: the dvc.yaml stages, one task each, through DVC's Python API.

DVC decides what is stale and writes dvc.lock exactly as `dvc repro` does, so a scheduled run and a
command-line run leave the same artifacts and lineage. Prefect adds retries where a retry can help,
per-stage timing in the UI, and a final state whose message says what happened.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from prefect import flow, task
from prefect.states import Completed, Failed

from pipeline import paths
from pipeline.cli import STAGES
from pipeline.io import read_report

# A retry helps where the stage talks to something that can blip (the tracking server, the serving
# target, a busy device); re-running prepare or validate on the same bytes gives the same answer.
RETRIES = {"train": 1, "register": 2, "promote": 2}


class StageError(RuntimeError):
    pass


def _cause(stage: str, root: Path) -> str:
    """Why a stage failed, from the report it leaves behind (the stage's own stderr is in the run log)."""
    if stage == "validate":
        failures = read_report(root / paths.VALIDATION_REPORT).get("failures")
        if failures:
            return "data validation failed: " + "; ".join(failures)
    if stage == "promote":
        reason = read_report(root / paths.PROMOTION).get("reason")
        if reason:
            return "promotion failed: " + reason
    return f"stage {stage} failed (see its output above)"


def run_stage(stage: str, root: str, force: bool = False) -> bool:
    """Reproduce one stage if DVC finds it stale; True if it ran."""
    from dvc.exceptions import ReproductionError
    from dvc.repo import Repo

    # DVC resolves outputs against the working directory, as `dvc repro` run in the project does.
    with contextlib.chdir(root), Repo(root) as repo:
        try:
            ran = repo.reproduce(stage, single_item=True, force=force)
        except ReproductionError:
            raise StageError(_cause(stage, Path(root))) from None
    return bool(ran)


def publish_artifacts(stage: str, root: Path) -> None:
    """What a person looking at the run in the Prefect UI needs, per stage (key: what it is)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    if stage == "validate" and (report := read_report(root / paths.VALIDATION_REPORT)):
        create_table_artifact(
            key="data-validation",
            table=[
                {k: c.get(k) for k in ("id", "scope", "check", "success", "blocking", "message")}
                for c in report["checks"]
            ],
            description=f"data {report['data_version'][:12]}: "
            + ("passed" if report["passed"] else "FAILED"),
        )
    elif stage == "evaluate" and (root / paths.GATE_MARKDOWN).exists():
        create_markdown_artifact(
            key="gate",
            markdown=(root / paths.GATE_MARKDOWN).read_text(),
            description="gate verdict for this candidate",
        )
    elif stage == "register" and (reg := read_report(root / paths.REGISTRATION)):
        text = (
            f"Registered **{reg['model_uri']}** (MLflow run `{reg['run_id']}`), alias @challenger."
            if reg["registered"]
            else "Not registered: " + "; ".join(reg["reasons"])
        )
        create_markdown_artifact(key="registration", markdown=text, description="model registry hand-off")


def outcome(root: Path) -> str:
    """One line on what the run decided, from the gate and promotion reports."""
    verdict = read_report(root / paths.GATE_REPORT)
    promotion = read_report(root / paths.PROMOTION)
    if verdict and not verdict.get("passed"):
        return "rejected: " + "; ".join(verdict["reasons"])
    if promotion.get("promoted"):
        return f"promoted v{promotion['version']}"
    return promotion.get("reason", "no promotion recorded")


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(root: str = ".", force: bool = False):
    """prepare → validate → train → evaluate → register → promote, skipping what DVC finds unchanged."""
    root_path = Path(root).resolve()
    ran = []
    for stage in STAGES:
        step = task(run_stage, name=stage, retries=RETRIES.get(stage, 0), retry_delay_seconds=[5, 30])
        try:
            if step(stage, str(root_path), force):
                ran.append(stage)
                publish_artifacts(stage, root_path)
        except StageError as err:
            publish_artifacts(stage, root_path)
            return Failed(message=str(err))
    verdict = outcome(root_path)
    message = verdict if ran else f"up to date, no stage ran (last outcome: {verdict})"
    print(f"stages run: {', '.join(ran) or 'none'}; {message}")
    return Completed(message=message)


@flow(name="rollback")
def rollback_flow(root: str = ".", to: str | None = None):
    """Restore an earlier champion (default @previous), verified on the serving target like a promotion."""
    from pipeline.config import load_params
    from pipeline.promote import PromotionError, rollback

    root_path = Path(root).resolve()
    try:
        result = rollback(load_params(root_path / paths.PARAMS), root_path, to)
    except PromotionError as err:
        return Failed(message=str(err))
    return Completed(message=result["summary"])
