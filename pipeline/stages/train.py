"""train: fit the classifier (pipeline/train.py) into one MLflow run, resumable after a kill, on one
process or as torchrun workers on one or several nodes (pipeline/distributed.py): rank 0 alone logs, the
first process of each node writes the outputs into its checkout."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline import codegraph, distributed, drift, paths, tracking
from pipeline import model as model_io
from pipeline.config import Params
from pipeline.data import load_split, read_manifest
from pipeline.files import atomic_dir, load_json, write_csv, write_json
from pipeline.stages import StageFailed, log, work, worker_main
from pipeline.train import TrainResult, fingerprint, load_checkpoint, world
from pipeline.train import train as fit


def run(params: Params, root: Path) -> dict:
    cfg = params.train
    if distributed.needs_torchrun(cfg.nproc_per_node, cfg.torchrun_args) and not distributed.is_worker():
        data_version = read_manifest(root / paths.PREPARED_DIR)["data_version"]
        key = distributed.job_key(params.seed, cfg.model_dump(mode="json"), data_version, _code())
        try:
            distributed.launch(cfg.nproc_per_node, cfg.torchrun_args, key, root)
        except distributed.LaunchError as err:
            raise StageFailed(str(err)) from None
        return load_json(root / paths.TRAIN_REPORT)
    with distributed.process_group(cfg.backend):
        return _train(params, root)


def _code() -> str:
    """A digest of every module the stage runs: a checkpoint or job of other code is another one."""
    return codegraph.digest(codegraph.closure([distributed.STAGE]))


def _resumable(root: Path, key: str, store: tracking.Store | None) -> dict | None:
    """The checkpoint of this very run (same settings, data, code, process count) when it can go on in its
    MLflow run: every node must have it, and rank 0 decides for all (`store` is None on the others)."""
    path = root / paths.TRAIN_CHECKPOINT
    state = load_checkpoint(path, key)
    run_id = state["extra"].get("run_id") if state else None
    usable = distributed.everyone(state is not None) and (store is None or store.run_exists(run_id))
    if not distributed.from_rank0(usable):
        if state is not None and store is not None:
            log(f"discarding the checkpoint: its MLflow run {run_id} was deleted; training afresh")
            path.unlink(missing_ok=True)
        return None
    return state


def _train(params: Params, root: Path) -> dict:
    rank, world_size = world()
    manifest = read_manifest(root / paths.PREPARED_DIR)
    meta = model_io.make_meta(params.train.arch, params.train.width, manifest)
    meta["params_hash"] = params.section_hash("seed", "data", "train")
    key = fingerprint(params.train, params.seed, meta, world_size, _code())
    store = tracking.connect(params, root) if rank == 0 else None
    resume = _resumable(root, key, store)
    splits = load_split(root / paths.PREPARED_DIR, "train"), load_split(root / paths.PREPARED_DIR, "val")
    checkpoint = root / paths.TRAIN_CHECKPOINT

    def train_into(run_id: str | None, on_epoch=None):
        return fit(
            params.train,
            params.seed,
            *splits,
            meta,
            on_epoch,
            checkpoint=checkpoint,
            resume=resume,
            extra_state={"run_id": run_id},
            run_key=key,
        )

    if rank != 0:  # the other processes train their share; rank 0 alone logs
        run_id = distributed.from_rank0(None)
        start = time.perf_counter()
        result = train_into(run_id)
        if not distributed.writes_outputs():
            return {}
        reference = _reference(result.model, splits, params)
        report = _persist(root, result, meta, run_id, world_size, time.perf_counter() - start, reference)
        write_json(root / paths.TRAIN_REPORT, report)
        log(f"node of rank {rank} trained its share of MLflow run {run_id}; its outputs are in this checkout")
        return report
    run_id = resume["extra"]["run_id"] if resume else None
    with tracking.training_run(params, run_id, f"train-{manifest['data_version'][:8]}") as mlflow_run:
        distributed.from_rank0(mlflow_run.info.run_id)
        run_params = {"seed": params.seed, "data.source": manifest["source"]}
        run_params.update({f"train.{k}": v for k, v in params.train})
        tracking.describe_training(run_params, root, manifest, meta, world_size, first=resume is None)
        if resume is not None:
            log(f"resuming from the checkpoint after epoch {resume['epoch']} (MLflow run {run_id})")
        start = time.perf_counter()
        with work():
            result = train_into(mlflow_run.info.run_id, _epoch_logger(params.train.epochs))
            reference = _reference(result.model, splits, params)
        wall = time.perf_counter() - start
        report = _persist(root, result, meta, mlflow_run.info.run_id, world_size, wall, reference)
        tracking.finish_training(root / paths.TRAIN_HISTORY, result.device, result.best_epoch)
    write_json(root / paths.TRAIN_REPORT, report)
    log(f"trained on {result.device} in {report['wall_s']:.1f}s; MLflow run {report['run_id']}")
    return report


def _epoch_logger(epochs: int):
    def on_epoch(row: dict) -> None:
        tracking.log_epoch(row)
        log(
            f"epoch {row['epoch']}/{epochs} loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f} "
            f"{row['images_per_s']:.0f} img/s"
        )

    return on_epoch


def _reference(model: model_io.Classifier, splits, params: Params) -> drift.Reference:
    """The drift reference: the trained model on (a seeded sample of) the validation split, or of the
    training split when there is next to no validation split (data.val_fraction 0)."""
    train, val = splits
    source = val if len(val.y) >= 10 else train
    n = min(len(source.y), params.train.reference_samples)
    idx = np.sort(np.random.default_rng(params.seed).choice(len(source.y), n, replace=False))
    x = np.asarray(source.x[idx])
    probs, emb = model_io.predict_with_embeddings(model.cpu().eval(), x)
    return drift.build_reference(
        probs.numpy(), emb.numpy(), x, len(source.classes), params.train.reference_components
    )


def _persist(
    root: Path,
    result: TrainResult,
    meta: dict,
    run_id: str,
    world_size: int,
    wall: float,
    reference: drift.Reference,
) -> dict:
    """The model and its drift reference, atomically; then the checkpoint goes (a later run starts
    afresh), the curves are written, and the report is returned for the caller to write last."""
    with atomic_dir(root / paths.MODEL_DIR) as tmp:
        model_io.save(result.model.cpu(), meta, tmp)
        drift.write_reference(tmp, reference)
    (root / paths.TRAIN_CHECKPOINT).unlink(missing_ok=True)
    write_csv(root / paths.TRAIN_HISTORY, result.history)
    last = result.history[-1] if result.history else {}
    return {
        "run_id": run_id,
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


if __name__ == "__main__":  # torchrun's workers (see pipeline/distributed.py)
    worker_main("train")
