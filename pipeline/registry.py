"""register: a gated candidate is logged in MLflow's model format, proven to serve (infra validation), then
registered with its lineage, a description and the gate.

What a person browsing the registry sees: the registered model's description says what it classifies, its
input, and how versions get there; each version's description carries the gate table, its tags the lineage
and a one-line gate verdict.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pipeline import failpoints, paths
from pipeline.config import Params
from pipeline.data import load_split, read_manifest
from pipeline.files import load_json
from pipeline.model import MLFLOW_ARTIFACT
from pipeline.serving.client import Server, free_port
from pipeline.tracking import CHALLENGER, Store, git_state, model_uri

MODEL_CODE = "pipeline.mlflow_model"  # what MLflow runs to load the model (pyfunc "model from code")
SERVER = "pipeline.serving.app"  # what infra validation starts in a fresh process


def pip_requirements() -> list[str]:
    """Every package the logged model's code imports, pinned to the version installed here: read from the
    code (pipeline.codegraph), so a new import cannot be forgotten and MLflow need not trace imports."""
    from importlib.metadata import version

    from pipeline import codegraph

    names = codegraph.distributions(codegraph.third_party(codegraph.closure([MODEL_CODE])))
    return sorted(f"{dist}=={version(dist)}" for dist in set(names.values()))


def _smoke_images(root: Path, n: int) -> np.ndarray:
    return np.asarray(load_split(root / paths.PREPARED_DIR, "test").x[:n])


def _model_spec(root: Path) -> dict:
    """Arguments of mlflow.pyfunc.log_model for the candidate in `models/`."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from pipeline import codegraph

    meta = load_json(root / paths.MODEL_DIR / "model.json")
    h, w, c = meta["input_shape"]
    return {
        "python_model": str(codegraph.module_file(MODEL_CODE)),
        "artifacts": {MLFLOW_ARTIFACT: str(root / paths.MODEL_DIR)},
        "code_paths": [str(codegraph.ROOT / codegraph.PACKAGE)],
        "signature": ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, h, w, c))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(meta["classes"])))]),
        ),
        "input_example": np.asarray(_smoke_images(root, 2), dtype=np.float32),
        "pip_requirements": pip_requirements(),
    }


def _evaluated_predictions(root: Path, n: int) -> list[str]:
    """The classes evaluation predicted for the first `n` test images (plots/confusion.csv keeps them)."""
    with open(root / paths.CONFUSION, newline="") as f:
        return [row["predicted"] for _, row in zip(range(n), csv.DictReader(f), strict=False)]


def infra_validate(params: Params, root: Path, location: str) -> str | None:
    """Serve the packaged candidate from a fresh process exactly as the serving target loads models, send
    it a real request, and compare with evaluation. Returns None when it passes, else the reason."""
    smoke_x = _smoke_images(root, params.serve.smoke_images)
    expected = _evaluated_predictions(root, len(smoke_x))
    port = free_port()
    cmd = [sys.executable, "-m", SERVER, "--model-uri", location, "--port", str(port)]
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


def model_description(meta: dict, source: str) -> str:
    """What the registered model is, for its page in the MLflow registry (markdown)."""
    h, w, c = meta["input_shape"]
    classes = meta["classes"]
    shown = ", ".join(classes[:20]) + (f" and {len(classes) - 20} more" if len(classes) > 20 else "")
    return (
        f"Image classifier over {len(classes)} classes ({shown}), trained by tollgate on `{source}` data.\n\n"
        f"**Input**: float32 pixels of shape (N, {h}, {w}, {c}), values 0..255 "
        f"({'grey' if c == 1 else 'RGB'}; images of any size are resized as in training). "
        "Normalisation is inside the model. "
        "**Output**: class probabilities (N, number of classes), in the class order above.\n\n"
        "**How versions get here**: only through the pipeline. The data passes validation (Great "
        "Expectations), the trained candidate passes the gate (absolute bounds and no regression against "
        "@champion re-scored on the same test split), then infra validation (the packaged model served from "
        "a fresh process must predict as evaluation did). Aliases: `@challenger` is the latest passing "
        "candidate, `@champion` is what serves, `@previous` the champion before it. A version's tags carry "
        "its lineage (git commit, data version, params hash) and its description the gate table."
    )


def register(store: Store, params: Params, root: Path, verdict: dict) -> dict:
    """Register a passing candidate (once per MLflow run) that also passes infra validation, and point
    @challenger at it; record a rejected one's reasons on its run. Returns (reports/registration.json,
    whether the version already existed). Run again after a failure at any point (the tracking server gone
    between logging and registering, say), it completes the same version's tags and aliases."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.evaluate import gate_markdown, gate_summary

    client = store.client
    run_id = verdict["run_id"]
    name = params.registry.model_name

    def reject(reasons: list[str]) -> tuple[dict, bool]:
        client.set_tag(run_id, "tollgate.rejected", "; ".join(reasons))
        return {"registered": False, "run_id": run_id, "reasons": reasons}, False

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
        except MlflowException:
            raise  # the tracking server or its artifact store failed: the stage fails and can be retried
        except Exception as err:  # noqa: BLE001 - any packaging fault rejects the candidate, with its message
            return reject(
                [f"infra validation failed: could not package the candidate in MLflow format: {err}"]
            )
        failure = infra_validate(params, root, client.get_logged_model(info.model_id).artifact_location)
        if failure is not None:
            return reject([f"infra validation failed: {failure}"])
        failpoints.reach("register:logged")
        version = str(mlflow.register_model(info.model_uri, name).version)
        failpoints.reach("register:version-created")

    metrics = load_json(root / paths.EVAL_METRICS)
    meta = load_json(root / paths.MODEL_DIR / "model.json")
    commit, dirty = git_state(root)
    tags = {
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "data_version": meta["data_version"],
        "params_hash": meta["params_hash"],
        "gate": gate_summary(verdict),
        "infra_validation": "passed",
        "accuracy": f"{metrics['accuracy']:.4f}",
        "macro_f1": f"{metrics['macro_f1']:.4f}",
        "device": load_json(root / paths.TRAIN_REPORT)["device"],
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(
        name,
        version,
        description=f"{meta['arch']} on data {meta['data_version'][:12]}: test accuracy {tags['accuracy']}, "
        f"macro-F1 {tags['macro_f1']}; gate and infra validation passed.\n\n" + gate_markdown(verdict),
    )
    client.update_registered_model(
        name, description=model_description(meta, read_manifest(root / paths.PREPARED_DIR)["source"])
    )
    client.set_registered_model_alias(name, CHALLENGER, version)
    result = {
        "registered": True,
        "name": name,
        "version": version,
        "run_id": run_id,
        "model_uri": model_uri(name, version),
    }
    return result, bool(existing)
