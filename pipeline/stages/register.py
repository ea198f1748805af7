"""register: a passing candidate becomes a registry version with @challenger, after infra validation
(pipeline/registry.py); a rejected one gets its reasons on its MLflow run."""

from __future__ import annotations

from pathlib import Path

from pipeline import paths, registry, tracking
from pipeline.config import Params
from pipeline.files import load_json, write_json
from pipeline.stages import log, work


def run(params: Params, root: Path) -> dict:
    store = tracking.connect(params, root)
    with work():
        result, existed = registry.register(store, params, root, load_json(root / paths.GATE_REPORT))
    write_json(root / paths.REGISTRATION, result)
    if result["registered"]:
        again = " (already registered for this run)" if existed else ""
        log(f"registered {result['name']} v{result['version']} @challenger{again}")
    else:
        log("not registered: " + "; ".join(result["reasons"]))
    return result
