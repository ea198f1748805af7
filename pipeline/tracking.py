"""MLflow adapter: the only module that talks to the tracking server and the model registry."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Params

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"


def tracking_uri(params: Params, root: Path) -> str:
    """MLFLOW_TRACKING_URI wins; else params.yaml's URI, a relative SQLite path taken from `root`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((root / uri[len(prefix) :]).resolve())
    return uri


def connect(params: Params, root: Path) -> str:
    """Point mlflow at the store and make sure the experiment exists; returns the experiment id."""
    import mlflow

    uri = tracking_uri(params, root)
    mlflow.set_tracking_uri(uri)
    name = params.registry.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        # Local stores: keep artifacts in the project, beside the database, not in whatever cwd happens to be.
        location = (root / params.mlflow.artifact_root).resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:
        # Another stage process created it between our lookup and create.
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@dataclass(frozen=True)
class VersionRef:
    name: str
    version: str
    run_id: str | None


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


def download_model_dir(name: str, version: str, dst: Path) -> Path:
    """Fetch a registered version's weights + metadata (no pyfunc load, no pickle) into `dst`."""
    import mlflow

    from pipeline.mlflow_model import ARTIFACT_KEY

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version}/artifacts/{ARTIFACT_KEY}", dst_path=str(dst)
    )
    return Path(local)


def git_state(root: Path) -> tuple[str, bool]:
    """(commit, dirty) of the project checkout; ("unknown", True) outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return commit, bool(status.strip())
