"""register: a passing candidate becomes a registry version with @challenger, after infra validation
(pipeline/release/register.py); a rejected one gets its reasons on its MLflow run."""

from __future__ import annotations

from pathlib import Path

from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.evaluation.verdict import Verdict
from pipeline.registry.store import connect
from pipeline.release.register import register
from pipeline.stages import log, work


def run(params: Params, root: Path) -> dict:
    store = connect(params, root)
    with work():
        result = register(store, params, root, Verdict.load(root / paths.GATE_REPORT))
    result.write(root / paths.REGISTRATION)
    if result.registered:
        again = " (already registered for this run)" if result.existed else ""
        log(f"registered {result.name} v{result.version} @{result.alias}{again}")
    else:
        log("not registered: " + "; ".join(result.reasons))
    return result.model_dump(mode="json")
