"""promote: make the version register just made @champion, with the serving targets following and
verified (pipeline/release/promote.py). Left alone: a rejected candidate, a version rolled back on purpose,
a DVC experiment's candidate (experiments are not production), and a candidate the online gate refuses; a
candidate whose gate compared against a champion that has moved since is fenced (evaluate again)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core import experiment, paths
from pipeline.core.config import Params
from pipeline.data.shards import open_folder
from pipeline.evaluation.online import online_gate
from pipeline.evaluation.verdict import Verdict
from pipeline.monitoring.shadow_report import shadow_summary
from pipeline.registry.store import connect
from pipeline.release.promote import Fenced, PromotionError, promote
from pipeline.release.results import Promotion, Registration
from pipeline.release.rollout import release_for
from pipeline.stages import StageFailed, log, work


def _refuse(root: Path, result: Promotion) -> None:
    result.write(root / paths.PROMOTION)
    raise StageFailed(result.reason)


def _promote(params: Params, root: Path, version: str) -> Promotion:
    needed = params.promote.shadow_min_requests
    if needed:
        seen = shadow_summary(
            open_folder(params.monitor.folder, root), open_folder(params.data.feedback, root), version
        )
        if reason := online_gate(seen, version, needed, params.promote.shadow_max_disagreement):
            _refuse(root, Promotion(promoted=False, reason=reason, shadow=seen))
    gated_against = Verdict.load(root / paths.GATE_REPORT).champion_version
    try:
        with work():
            result = promote(connect(params, root), params, root, version, gated_against, release_for(params))
    except Fenced as err:
        fenced = {"gated_against": err.gated, "champion": err.now}
        _refuse(root, Promotion(promoted=False, reason=str(err), fenced=fenced))
    except PromotionError as err:
        _refuse(root, Promotion(promoted=False, reason=str(err)))
    if result.canary is not None and not result.promoted:  # rolled back on live traffic: the stage fails
        _refuse(root, result)
    return result


def run(params: Params, root: Path) -> dict:
    registration = Registration.load(root / paths.REGISTRATION)
    exp = experiment.current()
    if not registration.registered:
        result = Promotion(promoted=False, reason="candidate rejected: " + "; ".join(registration.reasons))
    elif exp is not None:
        v = registration.version
        result = Promotion(
            promoted=False,
            version=v,
            experiment=exp.name,
            reason=f"experiment {exp.name}: not promoted (v{v} is @{registration.alias}; promote it with "
            f"`tollgate promote --version {v}`, or apply + commit and run on main)",
        )
    else:
        result = _promote(params, root, registration.version)
    result.write(root / paths.PROMOTION)
    log(
        result.summary
        if result.promoted
        else json.dumps(result.model_dump(mode="json", exclude_defaults=True))
    )
    return result.model_dump(mode="json")
