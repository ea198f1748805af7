"""promote: make the version register just made @champion, with the serving targets following and
verified (pipeline/promote.py); a rejected candidate or a version rolled back on purpose is left alone, and
a candidate whose gate compared against a champion that has moved since is fenced (evaluate again)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import paths, tracking
from pipeline.config import Params
from pipeline.files import load_json, write_json
from pipeline.promote import Fenced, PromotionError, promote
from pipeline.stages import StageFailed, log, work


def run(params: Params, root: Path) -> dict:
    registration = load_json(root / paths.REGISTRATION)
    if not registration["registered"]:
        result = {"promoted": False, "reason": "candidate rejected: " + "; ".join(registration["reasons"])}
    else:
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
