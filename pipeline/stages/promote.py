"""promote: make the version register just made @champion, with the serving targets following and
verified (pipeline/promote.py); a rejected candidate or a version rolled back on purpose is left alone, and
a candidate whose gate compared against a champion that has moved since is fenced (evaluate again)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import live, paths, tracking
from pipeline.config import Params
from pipeline.files import load_json, write_json
from pipeline.promote import Fenced, PromotionError, promote
from pipeline.stages import StageFailed, log, work


def run(params: Params, root: Path) -> dict:
    registration = load_json(root / paths.REGISTRATION)
    if not registration["registered"]:
        result = {"promoted": False, "reason": "candidate rejected: " + "; ".join(registration["reasons"])}
    else:
        online_gate(params, root, registration["version"])
        gated_against = load_json(root / paths.GATE_REPORT)["champion_version"]
        store = tracking.connect(params, root)
        try:
            with work():
                result = promote(store, params, root, registration["version"], gated_against)
        except PromotionError as err:
            failed = {"promoted": False, "reason": str(err)}
            if isinstance(err, Fenced):
                failed["fenced"] = {"gated_against": err.gated, "champion": err.now}
            write_json(root / paths.PROMOTION, failed)
            raise StageFailed(str(err)) from None
    write_json(root / paths.PROMOTION, result)
    log(result["summary"] if result["promoted"] else json.dumps(result))
    return result


def online_gate(params: Params, root: Path, version: str) -> None:
    """With `serve.shadow_min_requests`, the candidate must have run in shadow on that many live images
    (and disagreed with the champion on at most `serve.shadow_max_disagreement` of them) before it moves."""
    needed, most = params.serve.shadow_min_requests, params.serve.shadow_max_disagreement
    if needed == 0:
        return
    seen = live.shadow_summary(root / params.monitor.folder, root / params.data.feedback, version)
    reason = None
    if seen["images"] < needed:
        reason = (
            f"online gate: v{version} has run in shadow on {seen['images']} live images, "
            f"serve.shadow_min_requests needs {needed} (serve.shadow on, then promote again)"
        )
    elif seen["disagreement"] is None or seen["disagreement"] > most:
        reason = (
            f"online gate: v{version} disagrees with the champion on {seen['disagreement']:.3f} of its "
            f"shadow images, more than serve.shadow_max_disagreement {most}"
        )
    if reason:
        write_json(root / paths.PROMOTION, {"promoted": False, "reason": reason, "shadow": seen})
        raise StageFailed(reason)
