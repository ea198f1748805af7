"""promote: make the version register just made @champion, with the serving targets following and
verified (pipeline/release/promote.py); a rejected candidate or a version rolled back on purpose is left
alone, a candidate the online gate refuses does not move, and a candidate whose gate compared against a
champion that has moved since is fenced (evaluate again)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.evaluation.online import online_gate
from pipeline.evaluation.verdict import Verdict
from pipeline.monitoring.shadow_report import shadow_summary
from pipeline.registry.store import connect
from pipeline.release.promote import Fenced, PromotionError, promote
from pipeline.release.results import Promotion, Registration
from pipeline.stages import StageFailed, log, work


def _refuse(root: Path, result: Promotion) -> None:
    result.write(root / paths.PROMOTION)
    raise StageFailed(result.reason)


def run(params: Params, root: Path) -> dict:
    registration = Registration.load(root / paths.REGISTRATION)
    if not registration.registered:
        result = Promotion(promoted=False, reason="candidate rejected: " + "; ".join(registration.reasons))
    else:
        version = registration.version
        needed = params.promote.shadow_min_requests
        if needed:
            seen = shadow_summary(root / params.monitor.folder, root / params.data.feedback, version)
            if reason := online_gate(seen, version, needed, params.promote.shadow_max_disagreement):
                _refuse(root, Promotion(promoted=False, reason=reason, shadow=seen))
        gated_against = Verdict.load(root / paths.GATE_REPORT).champion_version
        try:
            with work():
                result = promote(connect(params, root), params, root, version, gated_against)
        except Fenced as err:
            _refuse(
                root,
                Promotion(
                    promoted=False, reason=str(err), fenced={"gated_against": err.gated, "champion": err.now}
                ),
            )
        except PromotionError as err:
            _refuse(root, Promotion(promoted=False, reason=str(err)))
    result.write(root / paths.PROMOTION)
    log(
        result.summary
        if result.promoted
        else json.dumps(result.model_dump(mode="json", exclude_defaults=True))
    )
    return result.model_dump(mode="json")
