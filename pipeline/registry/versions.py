"""How a candidate becomes a registry version: logged on its training run in MLflow's model format
("model from code": `pipeline/registry/pyfunc.py` and the weights, never a pickle), registered, described
and tagged, and pointed at by an alias.

What a person browsing the registry sees: the registered model's description says what it classifies, its
input, and how versions get there; each version's description carries the gate table, its tags the
lineage and a one-line gate verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import codegraph
from pipeline.core.files import load_json
from pipeline.registry.store import Store
from pipeline.training.model_folder import META, MLFLOW_ARTIFACT

MODEL_CODE = "pipeline.registry.pyfunc"  # what MLflow runs to load the model (pyfunc "model from code")


class PackagingError(RuntimeError):
    """The candidate could not be put in MLflow's model format (not a tracking-store failure)."""


@dataclass(frozen=True)
class Logged:
    uri: str  # the logged model's URI, what `register` takes
    location: str  # where its files are, what a fresh serving process loads


def pip_requirements(code: str = MODEL_CODE) -> list[str]:
    """Every package that `code` (the logged model's, by default) imports, pinned to the version installed
    here: read from the code (pipeline.core.codegraph), so a new import cannot be forgotten and MLflow need
    not trace imports."""
    from importlib.metadata import version

    names = codegraph.distributions(codegraph.third_party(codegraph.closure([code])))
    return sorted(f"{dist}=={version(dist)}" for dist in set(names.values()))


def model_spec(model_dir: Path, example: np.ndarray) -> dict:
    """Arguments of mlflow.pyfunc.log_model for the model folder `model_dir`."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    meta = load_json(model_dir / META)
    h, w, c = meta["input_shape"]
    return {
        "python_model": str(codegraph.module_file(MODEL_CODE)),
        "artifacts": {MLFLOW_ARTIFACT: str(model_dir)},
        "code_paths": [str(codegraph.ROOT / codegraph.PACKAGE)],
        # uint8 pixels: what prepare writes and what an image is, so mlflow.pyfunc callers pass them as they
        # have them (MLflow refuses any other dtype by name; float pixels need .astype("uint8") first)
        "signature": ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w, c))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(meta["classes"])))]),
        ),
        "input_example": np.asarray(example, dtype=np.uint8),
        "pip_requirements": pip_requirements(),
    }


def version_of_run(store: Store, name: str, run_id: str) -> str | None:
    """The version of `name` registered from training run `run_id`, if there is one."""
    existing = store.client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    return str(existing[0].version) if existing else None


def log_candidate(store: Store, run_id: str, model_dir: Path, example: np.ndarray) -> Logged:
    """Log the model folder on its training run, not registered yet. A tracking-store failure raises
    MLflow's own error (the stage fails and can be retried); any other fault raises PackagingError."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name="model", **model_spec(model_dir, example))
    except MlflowException:
        raise
    except Exception as err:  # noqa: BLE001 - any packaging fault rejects the candidate, with its message
        raise PackagingError(f"could not package the candidate in MLflow format: {err}") from None
    return Logged(info.model_uri, store.client.get_logged_model(info.model_id).artifact_location)


def register(logged: Logged, name: str) -> str:
    """Make the logged model a version of `name` in the store `connect` pointed mlflow at; returns the
    version."""
    import mlflow

    return str(mlflow.register_model(logged.uri, name).version)


def describe(store: Store, name: str, version: str, tags: dict[str, str], text: str, model_text: str) -> None:
    """A version's tags and description, and the registered model's description."""
    for key, value in tags.items():
        store.client.set_model_version_tag(name, version, key, value)
    store.client.update_model_version(name, version, description=text)
    store.client.update_registered_model(name, description=model_text)
