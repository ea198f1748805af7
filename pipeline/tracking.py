"""MLflow adapter: the only module that talks to the tracking server and the model registry."""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Params

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"
# Name of the weights + metadata folder inside a logged pyfunc model (see pipeline/mlflow_model.py).
MODEL_ARTIFACT_KEY = "model_dir"


def tracking_uri(params: Params, root: Path) -> str:
    """MLFLOW_TRACKING_URI wins; else params.yaml's URI, a relative SQLite path taken from `root`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((root / uri[len(prefix) :]).resolve())
    return uri


def connect(params: Params, root: Path) -> str:
    """Point mlflow at the store and make the project's experiment the active one; returns its id."""
    import mlflow

    # Stage logs are read by people and CI: no progress bars for millisecond-long local downloads.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri(params, root)
    mlflow.set_tracking_uri(uri)
    name = params.registry.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = None
        if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
            # Local stores: keep artifacts in the project beside the database, not in whatever cwd is.
            location = (root / params.mlflow.artifact_root).resolve().as_uri()
        # Another stage process may create it between our lookup and create: either way it exists after.
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            mlflow.create_experiment(name, artifact_location=location)
        exp = mlflow.get_experiment_by_name(name)
    # Active experiment: runs and logged models of this process land here, not in "Default".
    mlflow.set_experiment(experiment_id=exp.experiment_id)
    return exp.experiment_id


@dataclass(frozen=True)
class VersionRef:
    name: str
    version: str
    run_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def alias_version(name: str, alias: str) -> VersionRef | None:
    """The version behind `name@alias`, or None when the model or the alias does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        mv = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    return VersionRef(name, str(mv.version), mv.run_id)


def download_model_dir(model_uri: str, dst: Path) -> Path:
    """Fetch the weights + metadata folder of an MLflow-format model (`models:/<name>/<version>`, or a
    local MLflow model directory) into `dst`: no pyfunc load, no pickle."""
    import mlflow
    import yaml

    mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri}/MLmodel", dst_path=str(dst))
    pyfunc = yaml.safe_load(Path(mlmodel).read_text())["flavors"]["python_function"]
    rel = pyfunc["artifacts"][MODEL_ARTIFACT_KEY]["path"]
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri}/{rel}", dst_path=str(dst)))


def load_model(model_uri: str, device: str = "cpu"):
    """(model, meta) of an MLflow-format model, rebuilt from its weights and metadata exactly as the serving
    target loads it; the downloaded files are removed once loaded."""
    import tempfile

    from pipeline.model import load

    with tempfile.TemporaryDirectory() as tmp:
        return load(download_model_dir(model_uri, Path(tmp)), device)


def git_state(root: Path) -> tuple[str, bool]:
    """(commit, dirty) of the project checkout; ("unknown", True) outside git. Dirty means changed code or
    params: the pipeline's own outputs (dvc.lock, reports, metrics, which git tracks) do not count."""
    from pipeline import paths

    outputs = ["dvc.lock"] + [v for k, v in vars(paths).items() if k.isupper() and v != paths.PARAMS]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                *(f":(exclude){o}" for o in outputs),
            ],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return commit, bool(status.strip())
