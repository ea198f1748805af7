"""train: fit the classifier (pipeline/training/loop.py) into one MLflow run, resumable after a kill, on one
process or as torchrun workers on one or several nodes (pipeline/training/distributed.py): rank 0 alone
logs, the first process of each node writes the outputs into its checkout."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core import codegraph, paths
from pipeline.core.config import Params
from pipeline.core.experiment import project_root
from pipeline.core.files import atomic_dir, load_json, write_csv, write_json
from pipeline.data.prepared import Dataset, load_split, read_manifest
from pipeline.monitoring import drift
from pipeline.registry import runs
from pipeline.registry.store import Store, connect
from pipeline.stages import StageFailed, log, work, worker_main
from pipeline.training import backbones, checkpoint, distributed
from pipeline.training import model as model_io
from pipeline.training.loop import TrainResult, train, world


def run(params: Params, root: Path) -> dict:
    cfg = params.train
    if distributed.needs_torchrun(cfg.nproc_per_node, cfg.torchrun_args) and not distributed.is_worker():
        data_version = read_manifest(root / paths.PREPARED_DIR)["data_version"]
        key = distributed.job_key(params.seed, cfg.model_dump(mode="json"), data_version, _code())
        try:
            distributed.launch(__name__, cfg.nproc_per_node, cfg.torchrun_args, key, root)
        except distributed.LaunchError as err:
            raise StageFailed(str(err)) from None
        return load_json(root / paths.TRAIN_REPORT)
    with distributed.process_group(cfg.backend):
        return _train(params, root)


def _code() -> str:
    """A digest of every module the stage runs: a checkpoint or job of other code is another one."""
    return codegraph.digest(codegraph.closure([__name__]))


@dataclass
class _Job:
    """One training job: its params, data, model description and the checkpoint that may continue it."""

    params: Params
    root: Path
    manifest: dict
    meta: dict
    key: str
    splits: tuple[Dataset, Dataset]
    world_size: int
    weights: backbones.Weights

    @classmethod
    def of(cls, params: Params, root: Path) -> _Job:
        manifest = read_manifest(root / paths.PREPARED_DIR)
        t = params.train
        try:  # before any training: a wrong name or missing weights should cost seconds, not an epoch
            backbones.check_name(t.backbone)
            weights = backbones.resolve(t.backbone, t.pretrained, t.download_weights, project_root(root))
        except (ValueError, backbones.WeightsUnavailable) as err:
            raise StageFailed(str(err)) from None
        meta = model_io.make_meta(t.backbone, t.width, manifest, weights)
        expects = meta["pretrained"].get("expects")
        ours = (manifest["image_shape"][:2], meta["interpolation"])
        if expects and (expects["input_size"], expects["interpolation"]) != ours:
            log(f"note: {t.backbone}'s weights were trained on {expects['input_size']} inputs resized "
                f"{expects['interpolation']}; this data is {ours[0]}, {ours[1]} (data.image_size, "
                "data.interpolation)")  # fmt: skip
        meta["params_hash"] = params.section_hash("seed", "data", "train")
        world_size = world()[1]
        key = checkpoint.fingerprint(params.train, params.seed, meta, world_size, _code())
        splits = tuple(load_split(root / paths.PREPARED_DIR, s) for s in ("train", "val"))
        return cls(params, root, manifest, meta, key, splits, world_size, weights)

    def resumable(self, store: Store | None) -> dict | None:
        """The checkpoint of this very run when it can go on in its MLflow run: every node must have it,
        and rank 0 decides for all (`store` is None on the others)."""
        path = self.root / paths.TRAIN_CHECKPOINT
        state = checkpoint.load(path, self.key)
        run_id = state["extra"].get("run_id") if state else None
        usable = distributed.everyone(state is not None) and (store is None or store.run_exists(run_id))
        if distributed.from_rank0(usable):
            return state
        if state is not None and store is not None:
            log(f"discarding the checkpoint: its MLflow run {run_id} was deleted; training afresh")
            path.unlink(missing_ok=True)
        return None

    def fit(self, run_id: str | None, resume: dict | None, on_epoch=None) -> TrainResult:
        p = self.params
        return train(p.train, p.seed, *self.splits, self.meta, on_epoch, self.root / paths.TRAIN_CHECKPOINT,
                     resume, {"run_id": run_id}, self.key, self.weights)  # fmt: skip

    def reference(self, result: TrainResult) -> drift.Reference:
        t = self.params.train
        return drift.reference_for(result.model, *self.splits, self.params.seed, t.reference_samples,
                                   t.reference_components)  # fmt: skip

    def persist(
        self, result: TrainResult, reference: drift.Reference, run_id: str | None, wall: float
    ) -> dict:
        """The model and its drift reference, atomically; then the checkpoint goes (a later run starts
        afresh), the curves are written, and the report is returned for the caller to write last."""
        with atomic_dir(self.root / paths.MODEL_DIR) as tmp:
            model_io.save(result.model.cpu(), self.meta, tmp)
            drift.write_reference(tmp, reference)
        (self.root / paths.TRAIN_CHECKPOINT).unlink(missing_ok=True)
        write_csv(self.root / paths.TRAIN_HISTORY, result.history)
        return result.report(run_id, self.world_size, wall)


def _train(params: Params, root: Path) -> dict:
    job = _Job.of(params, root)
    rank = world()[0]
    if rank != 0:  # the other processes train their share; rank 0 alone logs
        # The collectives in the order rank 0 makes them: the checkpoint decision, then the run id.
        resume = job.resumable(None)
        run_id = distributed.from_rank0(None)
        start = time.perf_counter()
        result = job.fit(run_id, resume)
        if not distributed.writes_outputs():
            return {}
        reference = job.reference(result)
        report = job.persist(result, reference, run_id, time.perf_counter() - start)
        write_json(root / paths.TRAIN_REPORT, report)
        log(f"node of rank {rank} trained its share of MLflow run {run_id}; its outputs are in this checkout")
        return report
    store = connect(params, root)
    resume = job.resumable(store)
    run_id = resume["extra"]["run_id"] if resume else None
    with runs.training_run(params, run_id, f"train-{job.manifest['data_version'][:8]}") as mlflow_run:
        run_id = mlflow_run.info.run_id
        distributed.from_rank0(run_id)
        run_params = {"seed": params.seed, "data.source": job.manifest["source"]}
        run_params.update({f"train.{k}": v for k, v in params.train})
        runs.describe_training(run_params, root, job.manifest, job.meta, job.world_size, first=resume is None)
        if resume is not None:
            log(f"resuming from the checkpoint after epoch {resume['epoch']} (MLflow run {run_id})")
        start = time.perf_counter()
        with work():
            epochs = runs.EpochLog(params.mlflow.outage_s)
            result = job.fit(run_id, resume, _epoch_logger(epochs, params.train.epochs))
            reference = job.reference(result)
        report = job.persist(result, reference, run_id, time.perf_counter() - start)
        epochs.flush()
        runs.finish_training(root / paths.TRAIN_HISTORY, result.device, result.best_epoch)
    write_json(root / paths.TRAIN_REPORT, report)
    log(f"trained on {result.device} in {report['wall_s']:.1f}s; MLflow run {report['run_id']}")
    return report


def _epoch_logger(sink: runs.EpochLog, epochs: int):
    def on_epoch(row: dict) -> None:
        sink.add(row)
        log(
            f"epoch {row['epoch']}/{epochs} loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f} "
            f"{row['images_per_s']:.0f} img/s"
        )

    return on_epoch


if __name__ == "__main__":  # torchrun's workers (see pipeline/training/distributed.py)
    worker_main("train")
