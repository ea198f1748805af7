"""The tracking store and model registry: how tollgate names versions and aliases, and the one `Store`
through which everything reads or moves registry state.

`connect(params, root)` is the single place that sets MLflow's process-wide state (the tracking URI and the
active experiment, which `mlflow.start_run` and `mlflow.pyfunc.log_model` use) and it returns a `Store`.
Everything that reads or moves registry state takes that Store as an argument, so nothing depends on
someone having called `connect` first. mlflow is imported inside functions: the serving process and the
promote stage import this module and should not pay for mlflow until they use it.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.config import Params
from pipeline.core.experiment import project_root

if TYPE_CHECKING:
    from mlflow import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"
CANARY = "canary"  # a candidate taking a share of live requests in a rollout (pipeline/release/rollout.py)
# On the registered model: the share of requests (percent) servers send to @canary. In the registry, so
# replicas on any machine read the same weight as they read the alias, without being told.
CANARY_WEIGHT = "tollgate.canary.weight"
# MLflow's error codes for a model or alias that does not exist (a tracking server answers an alias it
# does not have with 400 INVALID_PARAMETER_VALUE, the SQL store with RESOURCE_DOES_NOT_EXIST)
ABSENT = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def model_uri(name: str, version: str) -> str:
    """The registry URI of one model version: how every part of tollgate names a version."""
    return f"models:/{name}/{version}"


def alias_uri(name: str, alias: str) -> str:
    return f"models:/{name}@{alias}"


def tracking_uri(params: Params, root: Path) -> str:
    """MLFLOW_TRACKING_URI wins; else params.yaml's URI, a relative SQLite path taken from the project's
    own checkout (a queued or --temp DVC experiment records into the project's store, not into a copy
    that vanishes with its temporary folder)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((project_root(root) / uri[len(prefix) :]).resolve())
    return uri


@dataclass(frozen=True)
class VersionRef:
    name: str
    version: str
    run_id: str | None

    @property
    def uri(self) -> str:
        return model_uri(self.name, self.version)


class Reads(ABC):
    """What a server reads from a registry: `Store` (MLflow's client) and the lean readers a serving
    replica uses instead (`pipeline.registry.reader`)."""

    @abstractmethod
    def version(self, name: str, alias: str) -> VersionRef | None:
        """The version behind `name@alias`, or None when the model or the alias does not exist."""

    @abstractmethod
    def model_tags(self, name: str) -> dict[str, str]:
        """The registered model's own tags (empty when the model does not exist yet)."""

    @abstractmethod
    def download_uri(self, name: str, version: str) -> str:
        """Where version `version` of `name` keeps its files (MLflow's `get_model_version_download_uri`)."""

    def location(self, uri: str) -> str:
        """Where a model's files are: a registry URI `models:/<name>/<version>` resolved, else `uri`."""
        if not uri.startswith("models:/") or "@" in uri:
            return uri
        name, version = uri.removeprefix("models:/").rsplit("/", 1)
        return self.download_uri(name, version)

    @abstractmethod
    def download_model_dir(self, uri: str, dst: Path) -> Path:
        """Fetch the weights + metadata folder of an MLflow-format model (a registry URI, or any artifact
        URI of a logged model) into `dst`: no pyfunc load, no pickle."""

    def read_model_dir(self, uri: str, read):
        """`read(folder)` on the downloaded model folder of an MLflow-format model, which is removed after."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return read(self.download_model_dir(uri, Path(tmp)))

    def canary_weight(self, name: str) -> float:
        """The share of requests (percent) for @canary now; 0 when unset or unreadable as a number."""
        try:
            return float(self.model_tags(name).get(CANARY_WEIGHT, 0))
        except ValueError:
            return 0.0


def weights_path(mlmodel: str) -> str:
    """Where, inside an MLflow-format model, its weights + metadata folder is (from the MLmodel file)."""
    import yaml

    from pipeline.training.model_folder import MLFLOW_ARTIFACT

    return yaml.safe_load(mlmodel)["flavors"]["python_function"]["artifacts"][MLFLOW_ARTIFACT]["path"]


@dataclass(frozen=True)
class Store(Reads):
    """One tracking store and registry, addressed explicitly (its client never reads global state)."""

    uri: str
    experiment_id: str
    client: MlflowClient = field(repr=False, compare=False)

    @classmethod
    def at(cls, uri: str) -> Store:
        """The store at `uri`, for reads and downloads (no experiment). Its client is given the registry
        URI too: given only a tracking URI, MLflow takes a registry URI that this process set earlier
        (`connect` to another project) over it."""
        from mlflow import MlflowClient

        return cls(uri, "", MlflowClient(tracking_uri=uri, registry_uri=uri))

    def version(self, name: str, alias: str) -> VersionRef | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except MlflowException as err:
            if err.error_code in ABSENT:
                return None
            raise
        return VersionRef(name, str(mv.version), mv.run_id)

    def point(self, name: str, alias: str, version: str | None) -> None:
        """Set `name@alias` to `version`, or remove the alias when `version` is None."""
        from mlflow.exceptions import MlflowException

        if version is None:
            with contextlib.suppress(MlflowException):  # already absent is fine
                self.client.delete_registered_model_alias(name, alias)
        else:
            self.client.set_registered_model_alias(name, alias, version)

    def download_uri(self, name: str, version: str) -> str:
        return self.client.get_model_version_download_uri(name, version)

    def download_model_dir(self, uri: str, dst: Path) -> Path:
        import mlflow

        base = self.location(uri)

        def fetch(rel: str) -> str:
            return mlflow.artifacts.download_artifacts(
                artifact_uri=f"{base}/{rel}", dst_path=str(dst), tracking_uri=self.uri, registry_uri=self.uri
            )

        return Path(fetch(weights_path(Path(fetch("MLmodel")).read_text())))

    def load_model(self, uri: str, device: str = "cpu"):
        """(model, meta) of an MLflow-format model, rebuilt from its weights and metadata exactly as the
        serving target loads it."""
        from pipeline.training.model import load

        return self.read_model_dir(uri, lambda folder: load(folder, device))

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        """The tags of `name` version `version`; LookupError naming it when there is no such version."""
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_model_version(name, version).tags)
        except MlflowException as err:
            raise LookupError(f"{name} has no version {version}: {err.message}") from None

    def tag_version(self, name: str, version: str, key: str, value: str | None) -> None:
        """Set a version's tag, or remove it when `value` is None (already absent is fine)."""
        from mlflow.exceptions import MlflowException

        if value is not None:
            self.client.set_model_version_tag(name, version, key, value)
            return
        with contextlib.suppress(MlflowException):
            self.client.delete_model_version_tag(name, version, key)

    def model_tags(self, name: str) -> dict[str, str]:
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_registered_model(name).tags)
        except MlflowException:
            return {}

    def tag_model(self, name: str, key: str, value: str | None) -> None:
        """Set a registered model's tag, or remove it when `value` is None (already absent is fine)."""
        from mlflow.exceptions import MlflowException

        if value is not None:
            self.client.set_registered_model_tag(name, key, value)
            return
        with contextlib.suppress(MlflowException):
            self.client.delete_registered_model_tag(name, key)

    def tag_run(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def run_exists(self, run_id: str) -> bool:
        """True for a run that exists and was not deleted (a checkpoint may outlive its run)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False


def local_store(uri: str) -> bool:
    """A store on this machine's disk (SQLite or files), not a server or a shared database."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


@contextlib.contextmanager
def _environment_kept(*names: str):
    """Undo what the block does to these environment variables. mlflow's setters also export the URI
    so that child processes inherit it; but MLFLOW_TRACKING_URI is how a *user* overrides params.yaml,
    so a long-lived process (a Prefect worker, a test session) that connected to one project would
    otherwise send every later project's stages into that first store."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def http_defaults(params: Params, uri: str) -> None:
    """MLflow's defaults retry a dead server for about four minutes; a stage should fail within one,
    naming the server (the user's own MLFLOW_HTTP_REQUEST_* settings win). Exported, so that child
    processes using MLflow's client inherit them."""
    if not uri.startswith(("http://", "https://")):
        return
    for var, value in (
        ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", params.mlflow.http_retries),
        ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", params.mlflow.http_backoff_s),
        ("MLFLOW_HTTP_REQUEST_TIMEOUT", params.mlflow.http_timeout_s),
    ):
        os.environ.setdefault(var, str(value))


CONNECTED: list[str] = []  # the stores this process connected to, for messages that name them


def connect(params: Params, root: Path) -> Store:
    """Point mlflow at the project's store, make its experiment the active one, and return the Store."""
    import mlflow
    from mlflow import MlflowClient

    # Stage logs are read by people and CI: no progress bars for millisecond-long local downloads.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri(params, root)
    CONNECTED.append(uri)
    http_defaults(params, uri)
    with _environment_kept("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = params.registry.experiment
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if local_store(uri):
            # Local stores: keep artifacts in the project beside the database, not in whatever cwd is.
            location = (project_root(root) / params.mlflow.artifact_root).resolve().as_uri()
        # Another stage process may create it between our lookup and create: either way it exists after.
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.create_experiment(name, artifact_location=location)
        exp = client.get_experiment_by_name(name)
    # Active experiment: runs and logged models of this process land here, not in "Default".
    mlflow.set_experiment(experiment_id=exp.experiment_id)
    if params.mlflow.system_metrics_s > 0:
        mlflow.set_system_metrics_sampling_interval(params.mlflow.system_metrics_s)
    return Store(uri, exp.experiment_id, client)


def tracking_failure(err: BaseException) -> str | None:
    """A tracking-store failure in words that name the store and what to do, or None for any other error.
    Reads only whether mlflow (and SQLAlchemy) are loaded: a command that never touched the store pays no
    import for asking."""
    import sys

    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    sqlalchemy_exc = sys.modules.get("sqlalchemy.exc")
    if mlflow_exceptions is not None and isinstance(err, mlflow_exceptions.MlflowException):
        message = err.message
    elif sqlalchemy_exc is not None and isinstance(err, sqlalchemy_exc.OperationalError):
        message = str(err.orig)
    else:
        return None
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (CONNECTED[-1] if CONNECTED else "the local store")
    if "database is locked" in message:
        return (
            f"the MLflow tracking store ({uri}) is locked by another process: wait for it to finish and run "
            "again (several writers at once want a tracking server: MLFLOW_TRACKING_URI)"
        )
    return f"the MLflow tracking server ({uri}) failed: {message}"
