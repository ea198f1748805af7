"""What runs in the tracking store record: training runs (params, lineage, epochs, system metrics), the
evaluation of a candidate on its run, a refused dataset's run, and monitoring runs; and the git state that
lineage tags carry.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.core.errors import Failure
from pipeline.core.files import load_json
from pipeline.registry.store import Store


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
    import mlflow

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


class EpochLog:
    """The active run's per-epoch metrics. A tracking server down for longer than one request's retries (a
    restart on a busy machine easily is) costs training nothing: the epochs that could not be sent are kept
    and sent with the next one, and `flush` waits for the server, up to `deadline_s`, before the run ends."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.pending: list[dict] = []

    def add(self, row: dict) -> None:
        self.pending.append(row)
        self._send()

    def flush(self) -> None:
        deadline = time.monotonic() + self.deadline_s
        while not self._send():
            if time.monotonic() > deadline:
                raise Failure(
                    f"the tracking server did not come back within mlflow.outage_s ({self.deadline_s:g} s): "
                    f"{len(self.pending)} epochs' metrics were not logged"
                )
            time.sleep(2)

    def _send(self) -> bool:
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            while self.pending:
                row = self.pending[0]
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
                self.pending.pop(0)
        except MlflowException as err:
            print(
                f"[tollgate] the tracking server did not take epoch {self.pending[0]['epoch']}'s metrics; "
                f"{len(self.pending)} kept for the next try ({err.message.splitlines()[0][:160]})",
                flush=True,
            )
            return False
        return True


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
    accuracy = report.get("accuracy") or {}
    figures.update(
        {f"accuracy_{k}": float(accuracy[k]) for k in ("estimate", "low", "high", "drop") if k in accuracy}
    )
    figures["retrain"] = float(bool(report.get("retrain")))
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
