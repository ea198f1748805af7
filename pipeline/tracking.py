"""MLflow adapter: the one module that talks to the tracking store and the model registry.

`connect(params, root)` is the single place that sets MLflow's process-wide state (the tracking URI and the
active experiment, which `mlflow.start_run` and `mlflow.pyfunc.log_model` use) and it returns a `Store`.
Everything that reads or moves registry state takes that Store as an argument, so nothing depends on
someone having called `connect` first. mlflow is imported inside functions: the serving process and the
promote stage import this module and should not pay for mlflow until they use it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import Params

if TYPE_CHECKING:
    from mlflow import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"


def model_uri(name: str, version: str) -> str:
    """The registry URI of one model version: how every part of tollgate names a version."""
    return f"models:/{name}/{version}"


def alias_uri(name: str, alias: str) -> str:
    return f"models:/{name}@{alias}"


def tracking_uri(params: Params, root: Path) -> str:
    """MLFLOW_TRACKING_URI wins; else params.yaml's URI, a relative SQLite path taken from `root`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((root / uri[len(prefix) :]).resolve())
    return uri


@dataclass(frozen=True)
class VersionRef:
    name: str
    version: str
    run_id: str | None

    @property
    def uri(self) -> str:
        return model_uri(self.name, self.version)


@dataclass(frozen=True)
class Store:
    """One tracking store and registry, addressed explicitly (its client never reads global state)."""

    uri: str
    experiment_id: str
    client: MlflowClient = field(repr=False, compare=False)

    def version(self, name: str, alias: str) -> VersionRef | None:
        """The version behind `name@alias`, or None when the model or the alias does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
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

    def location(self, uri: str) -> str:
        """Where a model's files are: a registry URI resolved to its artifact location, else `uri`."""
        if uri.startswith("models:/") and "@" not in uri:
            name, version = uri.removeprefix("models:/").rsplit("/", 1)
            return self.client.get_model_version_download_uri(name, version)
        return uri

    def download_model_dir(self, uri: str, dst: Path) -> Path:
        """Fetch the weights + metadata folder of an MLflow-format model (a registry URI, or any artifact
        URI of a logged model) into `dst`: no pyfunc load, no pickle."""
        import mlflow
        import yaml

        from pipeline.model import MLFLOW_ARTIFACT

        base = self.location(uri)

        def fetch(rel: str) -> str:
            return mlflow.artifacts.download_artifacts(
                artifact_uri=f"{base}/{rel}", dst_path=str(dst), tracking_uri=self.uri, registry_uri=self.uri
            )

        pyfunc = yaml.safe_load(Path(fetch("MLmodel")).read_text())["flavors"]["python_function"]
        return Path(fetch(pyfunc["artifacts"][MLFLOW_ARTIFACT]["path"]))

    def read_model_dir(self, uri: str, read):
        """`read(folder)` on the downloaded model folder of an MLflow-format model, which is removed after."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return read(self.download_model_dir(uri, Path(tmp)))

    def load_model(self, uri: str, device: str = "cpu"):
        """(model, meta) of an MLflow-format model, rebuilt from its weights and metadata exactly as the
        serving target loads it."""
        from pipeline.model import load

        return self.read_model_dir(uri, lambda folder: load(folder, device))

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


def connect(params: Params, root: Path) -> Store:
    """Point mlflow at the project's store, make its experiment the active one, and return the Store."""
    import mlflow
    from mlflow import MlflowClient

    # Stage logs are read by people and CI: no progress bars for millisecond-long local downloads.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri(params, root)
    if uri.startswith(("http://", "https://")):
        # MLflow's defaults retry a dead server for about four minutes; a stage should fail within one,
        # naming the server (the user's own MLFLOW_HTTP_REQUEST_* settings win).
        for var, value in (
            ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", params.mlflow.http_retries),
            ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", params.mlflow.http_backoff_s),
            ("MLFLOW_HTTP_REQUEST_TIMEOUT", params.mlflow.http_timeout_s),
        ):
            os.environ.setdefault(var, str(value))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = params.registry.experiment
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if local_store(uri):
            # Local stores: keep artifacts in the project beside the database, not in whatever cwd is.
            location = (root / params.mlflow.artifact_root).resolve().as_uri()
        # Another stage process may create it between our lookup and create: either way it exists after.
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.create_experiment(name, artifact_location=location)
        exp = client.get_experiment_by_name(name)
    # Active experiment: runs and logged models of this process land here, not in "Default".
    mlflow.set_experiment(experiment_id=exp.experiment_id)
    if params.mlflow.system_metrics_s > 0:
        mlflow.set_system_metrics_sampling_interval(params.mlflow.system_metrics_s)
    return Store(uri, exp.experiment_id, client)


@contextlib.contextmanager
def training_run(params: Params, run_id: str | None, run_name: str) -> Iterator:
    """The training run (new, or resumed after a crash), with MLflow's system metrics (CPU, memory, disk,
    network, and GPU when nvidia-ml-py finds one) sampled every `mlflow.system_metrics_s` seconds."""
    import mlflow

    with mlflow.start_run(
        run_id=run_id, run_name=run_name, log_system_metrics=params.mlflow.system_metrics_s > 0
    ) as run:
        yield run


def describe_training(run_params: dict, root: Path, manifest: dict, meta: dict, world_size: int, first: bool):
    """On the active training run: `run_params` and the validation report that let this data train (on the
    first attempt; a resumed run has them), then lineage and environment tags."""
    from importlib.metadata import version

    import mlflow

    from pipeline import paths
    from pipeline.files import load_json

    if first:
        mlflow.log_params(run_params)
        attach_validation(load_json(root / paths.VALIDATION_REPORT), root / paths.DATA_DOCS)
    commit, dirty = git_state(root)
    mlflow.set_tags(
        {
            "tollgate.data_version": manifest["data_version"],
            "tollgate.params_hash": meta["params_hash"],
            "tollgate.git_commit": commit,
            "tollgate.git_dirty": str(dirty).lower(),
            "tollgate.world_size": str(world_size),
            "tollgate.torch": version("torch"),
            "tollgate.torchvision": version("torchvision"),  # from its metadata: importing it costs ~2 s
            "tollgate.cpu_count": str(os.cpu_count()),
        }
    )


def log_epoch(row: dict) -> None:
    import mlflow

    mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])


def finish_training(history_csv: Path, device: str, best_epoch: int) -> None:
    """MLflow charts the per-epoch metrics itself; the CSV is the same curves as a file (and the DVC plot)."""
    import mlflow

    mlflow.log_artifact(str(history_csv), "training")
    mlflow.set_tags({"tollgate.device": device, "tollgate.best_epoch": str(best_epoch)})


def attach_validation(report: dict, docs_dir: Path) -> None:
    """The data validation report and its Data Docs site, on the active run."""
    import mlflow

    mlflow.log_dict(report, "data_validation/validation.json")
    mlflow.log_artifacts(str(docs_dir), "data_validation/data_docs")


def log_refused_data(store: Store, report: dict, docs_dir: Path) -> str:
    """A refused dataset never gets a training run: its report gets a run of its own. Returns its id."""
    import mlflow

    with mlflow.start_run(
        experiment_id=store.experiment_id, run_name=f"validate-{report['data_version'][:8]}"
    ) as run:
        mlflow.set_tags(
            {
                "tollgate.stage": "validate",
                "tollgate.data_version": report["data_version"],
                "tollgate.validation": "failed",
            }
        )
        mlflow.log_metrics(
            {"validation_failures": len(report["failures"]), "validation_warnings": len(report["warnings"])}
        )
        attach_validation(report, docs_dir)
        return run.info.run_id


def log_evaluation(
    run_id: str, metrics: dict, recall: dict, confusion: dict, figure, files: list[Path], gate: str
) -> None:
    """Evaluation results on the candidate's training run: test metrics, per-class recall, the confusion
    matrix as data and picture, the gate report files, and the gate's one-word outcome as a tag."""
    import mlflow

    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"test_{k}": float(v) for k, v in metrics.items()})
        mlflow.log_metrics({f"test_recall_{c}": r for c, r in recall.items()})
        mlflow.log_dict(confusion, "evaluation/confusion_matrix.json")
        mlflow.log_figure(figure, "evaluation/confusion_matrix.png")
        for path in files:
            mlflow.log_artifact(str(path), "evaluation")
        mlflow.set_tag("tollgate.gate", gate)


def log_monitoring(store: Store, name: str, report: dict, files: list[Path]) -> str:
    """A monitoring run in the project's experiment, tagged with the model version it judged (the version
    gets the verdict and the run id as tags too, so the registry page shows the last check)."""
    verdict = "drift" if report["drift"] else "ok"
    run = store.client.create_run(
        store.experiment_id,
        run_name=f"monitor-v{report['version']}",
        tags={
            "tollgate.kind": "monitoring",
            "tollgate.model_version": report["version"],
            "tollgate.drift": verdict,
        },
    )
    from mlflow.entities import Metric, Param

    run_id = run.info.run_id
    now = int(time.time() * 1000)
    figures = {
        f"drift_{check}{suffix}": float(result[key])
        for check, result in report["checks"].items()
        for suffix, key in (("_effect", "effect"), ("_p_value", "p_value"), ("", "drift"))
    }
    # One request for all of them: against a tracking server each log_* call is a round trip.
    store.client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in figures.items()],
        params=[Param("samples", str(report["samples"]))],
    )
    for path in files:
        store.client.log_artifact(run_id, str(path), "monitoring")
    store.client.set_terminated(run_id)
    store.client.set_model_version_tag(name, report["version"], "monitor.drift", verdict)
    store.client.set_model_version_tag(name, report["version"], "monitor.run_id", run_id)
    return run_id


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
