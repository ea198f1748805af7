"""register: hand a gated candidate to the MLflow model registry, with its lineage."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import paths, tracking
from pipeline.config import Params
from pipeline.io import read_json


def _pip_requirements() -> list[str]:
    """Pinned from the running environment, so MLflow need not import-trace the model to infer them."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "numpy", "mlflow", "pyyaml", "pydantic")]


def _log_model(params: Params, root: Path, run_id: str) -> str:
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    from pipeline.data import load_split
    from pipeline.model import load, predict_proba

    model, meta = load(root / paths.MODEL_DIR)
    example = np.asarray(load_split(root / paths.PREPARED_DIR, "test").x[:2], dtype=np.float32)
    signature = infer_signature(example, predict_proba(model, example).numpy())
    package = Path(__file__).resolve().parent
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(package / "mlflow_model.py"),
            artifacts={tracking.MODEL_ARTIFACT_KEY: str(root / paths.MODEL_DIR)},
            code_paths=[str(package)],
            signature=signature,
            input_example=example,
            pip_requirements=_pip_requirements(),
            registered_model_name=params.registry.model_name,
        )
    return str(info.registered_model_version)


def register(params: Params, root: Path, verdict: dict) -> dict:
    """Register a passing candidate (once per MLflow run) and point @challenger at it; record a failing
    one's reasons on its run. Returns what happened, for reports/registration.json."""
    from mlflow import MlflowClient

    tracking.connect(params, root)
    client = MlflowClient()
    run_id = verdict["run_id"]
    name = params.registry.model_name
    if not verdict["passed"]:
        client.set_tag(run_id, "tollgate.rejected", "; ".join(verdict["reasons"]))
        return {"registered": False, "run_id": run_id, "reasons": verdict["reasons"]}

    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    version = str(existing[0].version) if existing else _log_model(params, root, run_id)
    metrics = read_json(root / paths.EVAL_METRICS)
    train_report = read_json(root / paths.TRAIN_REPORT)
    meta = read_json(root / paths.MODEL_DIR / "model.json")
    commit, dirty = tracking.git_state(root)
    tags = {
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "data_version": meta["data_version"],
        "params_hash": meta["params_hash"],
        "gate": json.dumps(verdict["checks"]),
        "accuracy": f"{metrics['accuracy']:.4f}",
        "macro_f1": f"{metrics['macro_f1']:.4f}",
        "device": train_report["device"],
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(
        name,
        version,
        description=f"{meta['arch']} on data {meta['data_version'][:12]}: test accuracy {tags['accuracy']}, "
        f"macro-F1 {tags['macro_f1']}; gate passed.",
    )
    client.set_registered_model_alias(name, tracking.CHALLENGER, version)
    return {
        "registered": True,
        "existing": bool(existing),
        "name": name,
        "version": version,
        "run_id": run_id,
        "model_uri": f"models:/{name}/{version}",
    }
