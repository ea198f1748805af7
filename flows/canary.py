"""`canary-rollout`: a canary rollout (pipeline/release/rollout.py) driven by Prefect, one task per step with
retries on transient errors, a table artifact per step, and Prefect events a team's automations can
react to: `tollgate.canary.step` (each judged step), `tollgate.canary.rolled-back`, `tollgate.model.promoted`.
The code is the CLI's: the same registry state, so `tollgate canary status` and `tollgate promote --resume`
work on a rollout this flow started."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from pipeline.core import paths
from pipeline.core.config import load_params
from pipeline.registry.store import CHALLENGER, CHAMPION


def _event(name: str, model: str, payload: dict) -> None:
    from prefect.events import emit_event

    emit_event(event=name, resource={"prefect.resource.id": f"tollgate.model.{model}"}, payload=payload)


def _published(model: str):
    """What each judged step leaves: a table artifact and a `tollgate.canary.step` event."""
    from prefect.artifacts import create_table_artifact

    def seen(rollout, step) -> None:
        create_table_artifact(
            key=f"canary-v{rollout.version}-step-{rollout.step + 1}",
            table=step.checks or [{"check": "traffic", "passed": False, "detail": step.reason}],
            description=f"v{rollout.version} at {step.weight:g} %: {step.line()}",
        )
        _event(
            "tollgate.canary.step",
            model,
            {"version": rollout.version, "weight": step.weight, "passed": step.passed, "reason": step.reason},
        )

    return seen


@flow(name="canary-rollout", log_prints=True)
def canary_rollout(root: str = ".", version: str | None = None):
    """Roll `version` (default: @challenger) out on live traffic, step by step, to @champion or back."""
    from pipeline.registry.store import connect
    from pipeline.release import rollout as rollouts
    from pipeline.release.promote import PromotionError

    root_path = Path(root).resolve()
    params = load_params(root_path / paths.PARAMS)
    store, name = connect(params, root_path), params.registry.model_name
    ref = store.version(name, CHALLENGER) if version is None else None
    version = version or (ref.version if ref else None)
    if not version:
        return Failed(message=f"no version given and {name} has no @{CHALLENGER}")
    retries = params.flow.retries.get("promote", 0)
    step = task(rollouts.run_step, name="canary-step", retries=retries, cache_policy=NO_CACHE)
    begin = task(rollouts.begin, name="canary-begin", cache_policy=NO_CACHE)
    try:
        champion = store.version(name, CHAMPION)
        if champion is None or champion.version == version:
            result = rollouts.direct(store, params, root_path, version)
        else:
            begun = begin(store, params, root_path, version)
            result = rollouts.steps(store, params, root_path, begun, run=step, seen=_published(name))
    except PromotionError as err:
        _event("tollgate.canary.rolled-back", name, {"version": version, "reason": str(err)})
        return Failed(message=str(err))
    result.write(root_path / paths.PROMOTION)
    if not result.promoted:
        _event("tollgate.canary.rolled-back", name, {"version": version, "reason": result.reason})
        return Failed(message=result.reason)
    _event("tollgate.model.promoted", name, {"version": version, "previous": result.previous})
    return Completed(message=result.summary)
