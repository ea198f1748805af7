"""promote: make the version register just made @champion, with the serving target following and
verified (pipeline/promote.py); a rejected candidate or a version rolled back on purpose is left alone."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import paths, tracking
from pipeline.config import Params
from pipeline.files import load_json, write_json
from pipeline.promote import PromotionError, promote
from pipeline.stages import StageFailed, log, work


def run(params: Params, root: Path) -> dict:
    registration = load_json(root / paths.REGISTRATION)
    if not registration["registered"]:
        result = {"promoted": False, "reason": "candidate rejected: " + "; ".join(registration["reasons"])}
    else:
        store = tracking.connect(params, root)
        try:
            with work():
                result = promote(store, params, root, registration["version"])
        except PromotionError as err:
            write_json(root / paths.PROMOTION, {"promoted": False, "reason": str(err)})
            raise StageFailed(str(err)) from None
    write_json(root / paths.PROMOTION, result)
    log(result["summary"] if result["promoted"] else json.dumps(result))
    return result
