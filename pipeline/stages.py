"""The six DVC stages as thin adapters: read inputs, call the pure step, persist outputs, log to MLflow.

Each runs in its own process (`tollgate <stage>`), so heavy libraries are imported inside the function
that needs them: `tollgate prepare` never pays for torch or mlflow.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.config import Params
from pipeline.io import read_json, write_json, write_text


class StageFailed(RuntimeError):
    """A stage refuses to continue (bad data, failed promotion); the message names the cause."""


def _log(msg: str) -> None:
    print(f"[tollgate] {msg}", flush=True)


def prepare(params: Params, root: Path) -> dict:
    from pipeline.data import prepare as prepare_data
    from pipeline.sources import SourceError

    try:
        manifest = prepare_data(params.data, params.seed, root / paths.PREPARED_DIR, root / params.data.root)
    except SourceError as err:
        raise StageFailed(str(err)) from None
    sizes = {s: sum(c.values()) for s, c in manifest["counts"].items()}
    _log(
        f"prepared {params.data.source}: {sizes}, shape {manifest['image_shape']}, "
        f"data version {manifest['data_version'][:12]}"
    )
    return manifest


def validate(params: Params, root: Path) -> dict:
    from pipeline.io import atomic_dir
    from pipeline.validate import DOCS_INDEX, run_suite

    with atomic_dir(root / paths.DATA_DOCS) as docs:
        report = run_suite(root / paths.PREPARED_DIR, params.validate_, docs)
    n = len(report["checks"])
    for warning in report["warnings"]:
        _log(f"data validation warning (not blocking): {warning}")
    if not report["passed"]:
        # A refused dataset never gets a training run, so its report gets an MLflow run of its own.
        # (A passing one is attached to the training run: validate stays free of MLflow's import time.)
        report["mlflow_run_id"] = _log_validation(params, root, report)
        write_json(root / paths.VALIDATION_REPORT, report)
        lines = "\n".join(f"  - {f}" for f in report["failures"])
        raise StageFailed(
            f"data validation failed ({len(report['failures'])} of {n} checks); nothing downstream runs:\n"
            f"{lines}\nreports: {paths.VALIDATION_REPORT}, {paths.DATA_DOCS}/{DOCS_INDEX}, "
            f"MLflow run {report['mlflow_run_id']}"
        )
    write_json(root / paths.VALIDATION_REPORT, report)
    _log(f"data validation passed: {n} checks ({len(report['warnings'])} warnings)")
    return report


def _attach_validation(root: Path, report: dict) -> None:
    import mlflow

    mlflow.log_dict(report, "data_validation/validation.json")
    mlflow.log_artifacts(str(root / paths.DATA_DOCS), "data_validation/data_docs")


def _log_validation(params: Params, root: Path, report: dict) -> str:
    import mlflow

    from pipeline import tracking

    tracking.connect(params, root)
    with mlflow.start_run(run_name=f"validate-{report['data_version'][:8]}") as run:
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
        _attach_validation(root, report)
        return run.info.run_id


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def train(params: Params, root: Path) -> dict:
    cfg = params.train
    if cfg.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return _train_under_torchrun(params, root)
    import torch

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        backend = cfg.backend if cfg.backend != "auto" else "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    try:
        return _train(params, root)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def _train_under_torchrun(params: Params, root: Path) -> dict:
    """Re-run this stage as `torchrun ... -m pipeline.cli train`: the workers see LOCAL_RANK and train."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={params.train.nproc_per_node}",
        *params.train.torchrun_args,
        "-m",
        "pipeline.cli",
        "train",
    ]
    _log("launching " + " ".join(cmd[1:]))
    if subprocess.run(cmd, cwd=root).returncode != 0:
        raise StageFailed(f"distributed training failed ({' '.join(cmd[1:])}); see the worker logs above")
    return read_json(root / paths.TRAIN_REPORT)


def _train(params: Params, root: Path) -> dict:
    from importlib.metadata import version

    import mlflow
    import torch

    from pipeline import model as model_io
    from pipeline import tracking
    from pipeline.data import load_split, read_manifest
    from pipeline.io import atomic_dir
    from pipeline.train import fingerprint, load_checkpoint, world
    from pipeline.train import train as fit

    rank, world_size = world()
    prepared = root / paths.PREPARED_DIR
    manifest = read_manifest(prepared)
    meta = model_io.make_meta(params.train.arch, params.train.width, manifest)
    meta["params_hash"] = params.section_hash("seed", "data", "train")
    checkpoint = root / paths.TRAIN_CHECKPOINT
    resumable = load_checkpoint(checkpoint, fingerprint(params.train, params.seed, meta, world_size))
    run_id = resumable["extra"].get("run_id") if resumable else None
    train_set, val_set = load_split(prepared, "train"), load_split(prepared, "val")
    if rank != 0:  # other processes train their share; rank 0 alone logs and writes outputs
        fit(params.train, params.seed, train_set, val_set, meta, checkpoint=checkpoint, resume=resumable)
        return {}

    tracking.connect(params, root)
    commit, dirty = tracking.git_state(root)
    with mlflow.start_run(run_id=run_id, run_name=f"train-{manifest['data_version'][:8]}") as run:
        if resumable is None:
            mlflow.log_params(
                {
                    "seed": params.seed,
                    "data.source": manifest["source"],
                    **{f"train.{k}": v for k, v in params.train.model_dump().items()},
                }
            )
            _attach_validation(root, read_json(root / paths.VALIDATION_REPORT))
        else:
            _log(f"resuming from the checkpoint after epoch {resumable['epoch']} (MLflow run {run_id})")
        mlflow.set_tags(
            {
                "tollgate.data_version": manifest["data_version"],
                "tollgate.params_hash": meta["params_hash"],
                "tollgate.git_commit": commit,
                "tollgate.git_dirty": str(dirty).lower(),
                "tollgate.world_size": str(world_size),
                "tollgate.torch": torch.__version__,
                "tollgate.torchvision": version("torchvision"),  # its import costs ~2 s; no need here
                "tollgate.cpu_count": str(os.cpu_count()),
            }
        )

        def on_epoch(row: dict) -> None:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
            _log(
                f"epoch {row['epoch']}/{params.train.epochs} loss {row['train_loss']:.4f} "
                f"acc {row['train_accuracy']:.4f} val_loss {row['val_loss']:.4f} "
                f"val_acc {row['val_accuracy']:.4f} {row['images_per_s']:.0f} img/s"
            )

        start = time.perf_counter()
        result = fit(
            params.train,
            params.seed,
            train_set,
            val_set,
            meta,
            on_epoch,
            checkpoint=checkpoint,
            resume=resumable,
            extra_state={"run_id": run.info.run_id},
        )
        wall = time.perf_counter() - start
        with atomic_dir(root / paths.MODEL_DIR) as tmp:
            model_io.save(result.model.cpu(), meta, tmp)
        # The model is in place: the checkpoint has done its job, and a later run must start afresh.
        checkpoint.unlink(missing_ok=True)
        write_text(root / paths.TRAIN_HISTORY, _csv(result.history))
        # MLflow charts the per-epoch metrics itself; the CSV is the same curves as a file (and the DVC plot).
        mlflow.log_artifact(str(root / paths.TRAIN_HISTORY), "training")
        mlflow.set_tags({"tollgate.device": result.device, "tollgate.best_epoch": str(result.best_epoch)})
        last = result.history[-1] if result.history else {}
        report = {
            "run_id": run.info.run_id,
            "device": result.device,
            "world_size": world_size,
            "epochs": len(result.history),
            "best_epoch": result.best_epoch,
            "resumed_from": result.resumed_from,
            "wall_s": round(wall, 3),
            "images_per_s": round(float(np.mean([r["images_per_s"] for r in result.history] or [0.0])), 1),
            "val_accuracy": last.get("val_accuracy"),
            "val_loss": last.get("val_loss"),
        }
    write_json(root / paths.TRAIN_REPORT, report)
    _log(f"trained on {result.device} in {wall:.1f}s; MLflow run {report['run_id']}")
    return report


def _champion_metrics(params: Params, test) -> dict | None:
    """Load the current @champion from the registry and score it now on this test split."""

    from pipeline import model as model_io
    from pipeline import tracking
    from pipeline.evaluate import quality_metrics

    ref = tracking.alias_version(params.registry.model_name, tracking.CHAMPION)
    if ref is None:
        return None
    model, meta = tracking.load_model(ref.uri)
    champion = {"version": ref.version, "classes": meta["classes"], "metrics": None}
    if meta["classes"] == test.classes and list(meta["input_shape"]) == list(test.x.shape[1:]):
        probs = model_io.predict_proba(model, test.x).numpy()
        champion["metrics"] = quality_metrics(probs, test.y, test.classes, params.evaluate)
    return champion


def _log_confusion(cm, classes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt
    import mlflow

    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(classes), 1 + 0.5 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="actual",
        title="confusion matrix (test)",
    )
    for (i, j), n in np.ndenumerate(cm):
        ax.text(
            j, i, str(n), ha="center", va="center", fontsize=7, color="white" if n > cm.max() / 2 else "black"
        )
    fig.tight_layout()
    mlflow.log_figure(fig, "evaluation/confusion_matrix.png")
    plt.close(fig)


def evaluate(params: Params, root: Path) -> dict:
    import mlflow

    from pipeline import model as model_io
    from pipeline import tracking
    from pipeline.data import load_split
    from pipeline.evaluate import (
        confusion_matrix,
        gate,
        gate_markdown,
        quality_metrics,
        speed_metrics,
        stability_metrics,
    )

    cfg = params.evaluate
    run_id = read_json(root / paths.TRAIN_REPORT)["run_id"]
    model, meta = model_io.load(root / paths.MODEL_DIR)
    test = load_split(root / paths.PREPARED_DIR, "test")
    x = np.asarray(test.x)
    probs = model_io.predict_proba(model, x).numpy()
    pred = probs.argmax(1)

    quality = quality_metrics(probs, test.y, test.classes, cfg)
    quality.update(
        stability_metrics(lambda z: model_io.predict_proba(model, z).argmax(1).numpy(), x, pred, cfg)
    )
    quality["n_params"] = sum(p.numel() for p in model.parameters())
    quality["model_mb"] = (root / paths.MODEL_DIR / model_io.WEIGHTS).stat().st_size / 1e6
    perf = speed_metrics(lambda z: model_io.predict_proba(model, z), meta["input_shape"], cfg)
    perf["device"] = str(next(model.parameters()).device)

    tracking.connect(params, root)
    champion = _champion_metrics(params, test)
    verdict = gate({**quality, **perf}, test.classes, params.gate, champion)
    verdict.update(
        run_id=run_id,
        champion_version=champion["version"] if champion else None,
        data_version=meta["data_version"],
    )

    write_json(root / paths.EVAL_METRICS, quality)
    write_json(root / paths.PERF_METRICS, perf)
    write_text(
        root / paths.CONFUSION,
        _csv(
            [
                {"actual": test.classes[a], "predicted": test.classes[p]}
                for a, p in zip(test.y, pred, strict=True)
            ]
        ),
    )
    write_json(root / paths.GATE_REPORT, verdict)
    write_text(root / paths.GATE_MARKDOWN, gate_markdown(verdict))

    cm = confusion_matrix(test.y, pred, len(test.classes))
    flat = {
        k: v for k, v in {**quality, **perf}.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"test_{k}": float(v) for k, v in flat.items()})
        mlflow.log_metrics({f"test_recall_{c}": r for c, r in quality["per_class_recall"].items()})
        mlflow.log_dict({"classes": test.classes, "matrix": cm.tolist()}, "evaluation/confusion_matrix.json")
        _log_confusion(cm, test.classes)
        mlflow.log_artifact(str(root / paths.GATE_REPORT), "evaluation")
        mlflow.log_artifact(str(root / paths.GATE_MARKDOWN), "evaluation")
        mlflow.set_tag("tollgate.gate", "passed" if verdict["passed"] else "failed")
    _log(
        f"test accuracy {quality['accuracy']:.4f}, macro-F1 {quality['macro_f1']:.4f}, "
        f"p99 {perf['latency_p99_ms']:.2f} ms; gate "
        + ("PASSED" if verdict["passed"] else "FAILED: " + "; ".join(verdict["reasons"]))
    )
    for warning in verdict["warnings"]:
        _log(f"gate warning (not blocking): {warning}")
    return verdict


def register(params: Params, root: Path) -> dict:
    from pipeline import registry

    verdict = read_json(root / paths.GATE_REPORT)
    result = registry.register(params, root, verdict)
    write_json(root / paths.REGISTRATION, result)
    if result["registered"]:
        _log(
            f"registered {result['name']} v{result['version']} @challenger"
            + (" (already registered for this run)" if result["existing"] else "")
        )
    else:
        _log("not registered: " + "; ".join(result["reasons"]))
    return result


def promote(params: Params, root: Path) -> dict:
    from pipeline import promote as promotion

    registration = read_json(root / paths.REGISTRATION)
    if not registration["registered"]:
        result = {"promoted": False, "reason": "candidate rejected: " + "; ".join(registration["reasons"])}
    else:
        try:
            result = promotion.promote(params, root, registration["version"])
        except promotion.PromotionError as err:
            write_json(root / paths.PROMOTION, {"promoted": False, "reason": str(err)})
            raise StageFailed(str(err)) from None
    write_json(root / paths.PROMOTION, result)
    _log(json.dumps(result) if not result["promoted"] else result["summary"])
    return result
