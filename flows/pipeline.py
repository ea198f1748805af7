"""Prefect flows: `training-pipeline` (the dvc.yaml stages, one task each, through DVC's Python API),
`promote` and `rollback` (the CLI's code), with what a scheduled, unattended run needs around them.

DVC decides what is stale and writes dvc.lock exactly as `dvc repro` does, so a scheduled run and a
command-line run leave the same artifacts and lineage. Prefect adds retries with backoff where a retry can
help (`flow.retries` in params.yaml), a timeout per stage, artifacts for the UI, a final state whose message
says what happened, and a notification when a run fails or its candidate is rejected. One run at a time
per checkout: a file lock (`.tollgate/pipeline.lock`) makes a second run wait; the deployments in
prefect.yaml also set a concurrency limit of 1, so the server does not even start a second one.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.states import Completed, Failed
from prefect.tasks import exponential_backoff

from pipeline.core import paths
from pipeline.core.config import STAGES, FlowConfig, load_params
from pipeline.core.files import read_report, write_bytes
from pipeline.core.notify import notify
from pipeline.evaluation.verdict import Verdict
from pipeline.release.results import Promotion, Registration


class StageError(RuntimeError):
    pass


def _cause(stage: str, root: Path) -> str:
    """Why a stage failed, from the report it leaves behind (the stage's own stderr is in the run log)."""
    if stage == "validate":
        failures = read_report(root / paths.VALIDATION_REPORT).get("failures")
        if failures:
            return "data validation failed: " + "; ".join(failures)
    if stage == "promote":
        promotion = Promotion.read(root / paths.PROMOTION)
        if promotion and promotion.reason:
            return "promotion failed: " + promotion.reason
    return f"stage {stage} failed (see its output above)"


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Any:
    """Stop the stage's processes once `seconds` have passed. DVC runs the stage command as a child of this
    process and waits for it; killing it makes DVC report the stage as failed, as after a crash. The lock
    file still names the previous outputs: those outside DVC's cache were never removed (`persist` in
    dvc.yaml, and every stage writes atomically), the cached ones come back with `dvc checkout`. Only
    processes started after entry are touched: whatever else this process runs (a Prefect test server,
    say) is not the stage."""
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        for child in me.children(recursive=True):
            if child.pid not in before:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()

    timer = threading.Timer(seconds, expire) if seconds else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        yield fired
    finally:
        if timer:
            timer.cancel()


class StageTimeout(StageError):
    """Retrying a stage that ran out of time would only spend the same time again."""


class StageFenced(StageError):
    """Promotion found @champion moved since evaluation: retrying promote alone would be fenced again."""


def _worth_retrying(task, task_run, state) -> bool:
    return not isinstance(state.result(raise_on_failure=False), StageTimeout | StageFenced)


def run_stage(stage: str, root: str, force: bool = False, timeout_s: float | None = None) -> bool:
    """Reproduce one stage if DVC finds it stale; True if it ran."""
    from dvc.exceptions import ReproductionError
    from dvc.repo import Repo

    # DVC resolves outputs against the working directory, as `dvc repro` run in the project does.
    with contextlib.chdir(root), Repo(root) as repo, _deadline(timeout_s) as expired:
        try:
            ran = repo.reproduce(stage, single_item=True, force=force)
        except ReproductionError:
            if expired.is_set():
                msg = f"stage {stage} timed out after {timeout_s:g} s (flow.timeout_s)"
                raise StageTimeout(msg) from None
            promotion = Promotion.read(Path(root) / paths.PROMOTION) if stage == "promote" else None
            fenced = promotion is not None and promotion.fenced is not None
            raise (StageFenced if fenced else StageError)(_cause(stage, Path(root))) from None
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
    elif stage == "register" and (reg := Registration.read(root / paths.REGISTRATION)):
        text = (
            f"Registered **{reg.model_uri}** (MLflow run `{reg.run_id}`), alias @challenger."
            if reg.registered
            else "Not registered: " + "; ".join(reg.reasons)
        )
        create_markdown_artifact(key="registration", markdown=text, description="model registry hand-off")


def outcome(root: Path) -> str:
    """One line on what the run decided, from the gate and promotion reports."""
    verdict = Verdict.read(root / paths.GATE_REPORT)
    promotion = Promotion.read(root / paths.PROMOTION)
    if verdict and not verdict.passed:
        return "rejected: " + "; ".join(verdict.reasons)
    if promotion is None:
        return "no promotion recorded"
    return f"promoted v{promotion.version}" if promotion.promoted else promotion.line()


def set_params(root: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Write `overrides` (dotted keys) into params.yaml the way `dvc exp run --set-param` does: in place,
    comments kept, checked first. dvc.lock then records exactly the values the run used."""
    import yaml
    from dvc.utils.serialize import modify_yaml

    from pipeline.core.config import set_dotted, with_overrides

    path = root / paths.PARAMS
    with_overrides(yaml.safe_load(path.read_text()) or {}, overrides, "flow parameters")
    with modify_yaml(path) as data:  # DVC's round-trip YAML: comments and layout survive
        set_dotted(data, overrides)
    return overrides


def _link_mlflow(root: Path) -> None:
    """The registered version and its MLflow run, as a link when the tracking server has a web UI."""
    from prefect.artifacts import create_link_artifact

    reg = Registration.read(root / paths.REGISTRATION)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or load_params(root / paths.PARAMS).mlflow.tracking_uri
    if reg and reg.registered and uri.startswith("http"):
        create_link_artifact(
            key="mlflow-run",
            link=f"{uri.rstrip('/')}/#/models/{reg.name}/versions/{reg.version}",
            link_text=f"{reg.name} v{reg.version} (run {reg.run_id})",
        )


def _announce_registration(root: Path) -> None:
    """A `tollgate.model.registered` event for a new version: what the canary-rollout deployment's trigger
    (prefect.yaml) waits for."""
    from prefect.events import emit_event

    reg = Registration.read(root / paths.REGISTRATION)
    if reg and reg.registered and not reg.experiment:
        emit_event(
            event="tollgate.model.registered",
            resource={"prefect.resource.id": f"tollgate.model.{reg.name}"},
            payload={"version": reg.version, "run_id": reg.run_id},
        )


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(root: str = ".", force: bool = False, params: dict[str, Any] | None = None):
    """prepare → validate → train → evaluate → register → promote, skipping what DVC finds unchanged.
    `params` overrides params.yaml values (dotted keys, `dvc exp run --set-param` semantics) for this run:
    they stay in params.yaml only if the run promotes the model they made; otherwise params.yaml is put
    back as it was, so later scheduled runs never inherit an experiment's values, and the final message
    says which happened."""
    from filelock import FileLock, Timeout
    from prefect.artifacts import create_markdown_artifact

    root_path = Path(root).resolve()
    lock = FileLock(root_path / paths.PIPELINE_LOCK)
    try:
        held = lock.acquire(timeout=load_params(root_path / paths.PARAMS).flow.lock_timeout_s)
    except Timeout:
        return Failed(
            message=f"another pipeline run holds {paths.PIPELINE_LOCK} in {root_path}; gave up waiting"
        )
    with held:
        original = (root_path / paths.PARAMS).read_bytes()
        if params:
            set_params(root_path, params)
            create_markdown_artifact(
                key="params",
                markdown="Overrides applied to params.yaml (recorded in dvc.lock):\n\n"
                + "\n".join(f"- `{k}` = `{json.dumps(v)}`" for k, v in params.items()),
            )
        cfg = load_params(root_path / paths.PARAMS).flow
        ran: list[str] = []
        try:
            state = _run_stages(root_path, force, cfg, ran)
        finally:
            promotion = Promotion.read(root_path / paths.PROMOTION)
            kept = "promote" in ran and promotion is not None and promotion.promoted
            if params and not kept:
                write_bytes(root_path / paths.PARAMS, original)
        if params:
            note = (
                "params.yaml keeps the overrides that made the champion (commit it)"
                if kept
                else "overrides undone: params.yaml is as before this run (dvc status shows their effect)"
            )
            state = (Completed if state.is_completed() else Failed)(message=f"{state.message}; {note}")
    if state.is_failed() or state.message.startswith("rejected"):
        notify(cfg, f"tollgate training-pipeline in {root_path}: {state.message}")
    return state


def _run_stages(root: Path, force: bool, cfg: FlowConfig, ran: list[str]):
    """Run the stages in order, appending to `ran` those DVC did not skip; the flow's final state. A
    promotion fenced because another run moved @champion since evaluation re-runs evaluate (against the
    new champion), register and promote, once."""
    todo, forced, regated = list(STAGES), set(), False
    while todo:
        stage = todo.pop(0)
        retries = cfg.retries.get(stage, 0)
        step = task(
            run_stage,
            name=stage,
            retries=retries,
            retry_delay_seconds=exponential_backoff(cfg.retry_backoff_s) if retries else 0,
            retry_condition_fn=_worth_retrying,
        )
        try:
            if step(stage, str(root), force or stage in forced, cfg.timeout_s.get(stage)):
                ran.append(stage)
                publish_artifacts(stage, root)
        except StageFenced as err:
            if regated:
                return Failed(message=str(err))
            print(f"{err}: evaluating again against the new champion, once")
            todo, forced, regated = ["evaluate", "register", "promote"], {"evaluate"}, True
        except StageError as err:
            publish_artifacts(stage, root)
            return Failed(message=str(err))
    if "register" in ran:
        _link_mlflow(root)
        _announce_registration(root)
    verdict = outcome(root)
    message = verdict if ran else f"up to date, no stage ran (last outcome: {verdict})"
    print(f"stages run: {', '.join(ran) or 'none'}; {message}")
    return Completed(message=message)


@flow(name="promote")
def promote_flow(root: str = ".", version: str | None = None):
    """Make `version` (default: the one the last run registered) @champion, verified on the serving
    target: the code `tollgate promote` runs."""
    from pipeline.registry.store import connect
    from pipeline.release.promote import PromotionError, promote

    root_path = Path(root).resolve()
    params = load_params(root_path / paths.PARAMS)
    registered = Registration.read(root_path / paths.REGISTRATION)
    version = version or (registered.version if registered else None)
    if not version:
        return Failed(message="no version given and no registered candidate in reports/registration.json")
    try:
        result = promote(connect(params, root_path), params, root_path, version)
    except PromotionError as err:
        return Failed(message=str(err))
    return Completed(message=result.line())


@flow(name="rollback")
def rollback_flow(root: str = ".", to: str | None = None):
    """Restore an earlier champion (default @previous), verified on the serving target like a promotion."""
    from pipeline.registry.store import connect
    from pipeline.release.promote import PromotionError, rollback

    root_path = Path(root).resolve()
    params = load_params(root_path / paths.PARAMS)
    try:
        result = rollback(connect(params, root_path), params, root_path, to)
    except PromotionError as err:
        return Failed(message=str(err))
    return Completed(message=result.summary)
