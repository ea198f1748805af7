"""register: log a gated candidate in MLflow's model format, prove it serves (infra validation), then hand
it to the model registry with its lineage."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pipeline import paths, tracking
from pipeline.config import Params
from pipeline.io import read_json


def _pip_requirements() -> list[str]:
    """Pinned from the running environment, so MLflow need not import-trace the model to infer them."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "numpy", "mlflow", "pyyaml", "pydantic")]


def _model_spec(root: Path) -> dict:
    """Arguments of mlflow.pyfunc.save_model/log_model for the candidate in `models/`."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    meta = read_json(root / paths.MODEL_DIR / "model.json")
    h, w, c = meta["input_shape"]
    example = np.asarray(_smoke_images(root, 2), dtype=np.float32)
    package = Path(__file__).resolve().parent
    return {
        "python_model": str(package / "mlflow_model.py"),
        "artifacts": {tracking.MODEL_ARTIFACT_KEY: str(root / paths.MODEL_DIR)},
        "code_paths": [str(package)],
        "signature": ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, h, w, c))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(meta["classes"])))]),
        ),
        "input_example": example,
        "pip_requirements": _pip_requirements(),
    }


def _smoke_images(root: Path, n: int) -> np.ndarray:
    from pipeline.data import load_split

    return np.asarray(load_split(root / paths.PREPARED_DIR, "test").x[:n])


def _evaluated_predictions(root: Path, n: int) -> list[str]:
    """The classes evaluation predicted for the first `n` test images (plots/confusion.csv keeps them)."""
    with open(root / paths.CONFUSION, newline="") as f:
        return [row["predicted"] for _, row in zip(range(n), csv.DictReader(f), strict=False)]


def infra_validate(params: Params, root: Path, model_uri: str) -> str | None:
    """Serve the packaged candidate from a fresh process exactly as the serving target loads models, send
    it a real request, and compare with evaluation. Returns None when it passes, else the reason."""
    from pipeline.serve import free_port
    from pipeline.target import Server

    n = params.serve.smoke_images
    smoke_x = _smoke_images(root, n)
    expected = _evaluated_predictions(root, len(smoke_x))
    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--model-uri", model_uri, "--port", str(port)]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        server = Server(f"http://127.0.0.1:{port}")
        try:
            server.wait_ready(params.serve.timeout_s, alive=lambda: proc.poll() is None)
            meta = server.call("GET", f"/v2/models/{params.registry.model_name}")
            out = server.call("POST", "/invocations", {"inputs": smoke_x.astype(float).tolist()})
        except (OSError, ValueError, TimeoutError) as err:
            log.seek(0)
            tail = " | ".join(log.read().strip().splitlines()[-3:])
            return f"candidate did not serve: {err}" + (f" ({tail})" if tail else "")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    probs = np.asarray(out.get("predictions"))
    if probs.shape != (len(smoke_x), len(meta["classes"])):
        return f"served output has shape {list(probs.shape)}, expected {[len(smoke_x), len(meta['classes'])]}"
    got = [meta["classes"][i] for i in probs.argmax(1)]
    if got != expected:
        diff = sum(a != b for a, b in zip(got, expected, strict=True))
        return f"served predictions differ from evaluation on {diff} of {len(expected)} test images"
    return None


def register(params: Params, root: Path, verdict: dict) -> dict:
    """Register a passing candidate (once per MLflow run) that also passes infra validation, and point
    @challenger at it; record a rejected one's reasons on its run. Returns reports/registration.json."""
    import mlflow
    from mlflow import MlflowClient

    tracking.connect(params, root)
    client = MlflowClient()
    run_id = verdict["run_id"]
    name = params.registry.model_name

    def reject(reasons: list[str]) -> dict:
        client.set_tag(run_id, "tollgate.rejected", "; ".join(reasons))
        return {"registered": False, "run_id": run_id, "reasons": reasons}

    if not verdict["passed"]:
        return reject(verdict["reasons"])
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:
        version = str(existing[0].version)
    else:
        # Logged on the run (not yet registered), then served from the tracking store by a fresh process:
        # only a package that serves like evaluation predicted becomes a registry version.
        try:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(name="model", **_model_spec(root))
        except Exception as err:  # noqa: BLE001 - any packaging fault rejects the candidate, with its message
            return reject(
                [f"infra validation failed: could not package the candidate in MLflow format: {err}"]
            )
        failure = infra_validate(params, root, client.get_logged_model(info.model_id).artifact_location)
        if failure is not None:
            return reject([f"infra validation failed: {failure}"])
        version = str(mlflow.register_model(info.model_uri, name).version)

    metrics = read_json(root / paths.EVAL_METRICS)
    meta = read_json(root / paths.MODEL_DIR / "model.json")
    commit, dirty = tracking.git_state(root)
    tags = {
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "data_version": meta["data_version"],
        "params_hash": meta["params_hash"],
        "gate": json.dumps(verdict["checks"]),
        "infra_validation": "passed",
        "accuracy": f"{metrics['accuracy']:.4f}",
        "macro_f1": f"{metrics['macro_f1']:.4f}",
        "device": read_json(root / paths.TRAIN_REPORT)["device"],
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(
        name,
        version,
        description=f"{meta['arch']} on data {meta['data_version'][:12]}: test accuracy {tags['accuracy']}, "
        f"macro-F1 {tags['macro_f1']}; gate and infra validation passed.",
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
