"""evaluate: the candidate's test metrics, speed and behaviour (pipeline/evaluation/metrics.py), the
@champion re-scored on the same split, and the gate's verdict (pipeline/evaluation/gate.py). The verdict is
data: this stage succeeds either way, and register and promote read it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.core.files import load_json, write_csv, write_json, write_text
from pipeline.data.prepared import FEEDBACK, Dataset, load_split, read_manifest, splits_of
from pipeline.evaluation import card, figures, metrics, mistakes
from pipeline.evaluation.champion import champion_scores
from pipeline.evaluation.gate import gate
from pipeline.evaluation.verdict import Verdict
from pipeline.registry import runs
from pipeline.registry.store import connect
from pipeline.stages import log, work
from pipeline.training import model as model_io


def _feedback_slice(prepared: Path) -> Dataset | None:
    if FEEDBACK not in splits_of(read_manifest(prepared)):
        return None
    part = load_split(prepared, FEEDBACK)
    return part if len(part.y) else None


def run(params: Params, root: Path) -> dict:
    cfg = params.evaluate
    train = load_json(root / paths.TRAIN_REPORT)
    run_id = train["run_id"]
    model, meta = model_io.load(root / paths.MODEL_DIR)
    test = load_split(root / paths.PREPARED_DIR, "test")
    feedback = _feedback_slice(root / paths.PREPARED_DIR)
    store = connect(params, root)

    def probs_of(pixels) -> np.ndarray:
        return model_io.predict_proba(model, pixels).numpy()

    with work():
        quality, probs = metrics.assess(probs_of, np.asarray(test.x), test.y, test.classes, cfg)
        pred = probs.argmax(1)
        quality["n_params"] = sum(p.numel() for p in model.parameters())
        quality["model_mb"] = (root / paths.MODEL_DIR / model_io.WEIGHTS).stat().st_size / 1e6
        if feedback is not None:
            quality["feedback_accuracy"] = metrics.slice_accuracy(probs_of, feedback)
            quality["feedback_images"] = len(feedback.y)
        perf = metrics.speed_metrics(probs_of, meta["input_shape"], cfg)
        perf["device"] = str(next(model.parameters()).device)
        champion = champion_scores(store, params.registry.model_name, test, cfg, feedback)
        verdict = gate({**quality, **perf}, test.classes, params.gate, champion, pred == test.y)
    if verdict.paired is not None:
        quality["paired"] = verdict.paired.model_dump(mode="json")
    verdict = verdict.model_copy(
        update={
            "run_id": run_id,
            "champion_version": champion and champion.version,
            "data_version": meta["data_version"],
        }
    )
    cm = _persist(root, quality, perf, verdict, test, pred)
    with work():
        _describe(params, root, (model, meta, train), quality, verdict, test, probs, cm)
    numbers = {
        k: v for k, v in {**quality, **perf}.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    runs.log_evaluation(
        run_id,
        numbers,
        quality["per_class_recall"],
        {"classes": test.classes, "matrix": cm.tolist()},
        figures.confusion_figure(cm, test.classes),
        [root / p for p in (paths.GATE_REPORT, paths.GATE_MARKDOWN, paths.MODEL_CARD, paths.MISTAKES)],
        verdict.summary(),
    )
    log(
        f"test accuracy {quality['accuracy']:.4f}, macro-F1 {quality['macro_f1']:.4f}, "
        f"p99 {perf['latency_p99_ms']:.2f} ms; gate {verdict.headline()}"
    )
    for warning in verdict.warnings:
        log(f"gate warning (not blocking): {warning}")
    return verdict.model_dump(mode="json", by_alias=True)


def _describe(params: Params, root: Path, loaded, quality: dict, verdict: Verdict, test, probs, cm) -> None:
    """The model card and the picture of the worst mistakes it links to."""
    model, meta, train = loaded
    cfg = params.evaluate
    pairs = mistakes.confused_pairs(cm, cfg.mistake_pairs)
    mistakes.write_grid(root / paths.MISTAKES, model, test.x, probs, test.y, test.classes, pairs,
                        cfg.mistakes_per_pair)  # fmt: skip
    manifest = read_manifest(root / paths.PREPARED_DIR)
    text = card.model_card(meta, manifest, quality, train, verdict, cm, pairs, params.gate.max_ece)
    write_text(root / paths.MODEL_CARD, text)


def _persist(root: Path, quality: dict, perf: dict, verdict: Verdict, test, pred: np.ndarray) -> np.ndarray:
    """The metrics, the confusion plot's rows and the gate report; returns the confusion matrix."""
    write_json(root / paths.EVAL_METRICS, quality)
    write_json(root / paths.PERF_METRICS, perf)
    write_csv(
        root / paths.CONFUSION,
        [
            {"actual": test.classes[a], "predicted": test.classes[p]}
            for a, p in zip(test.y, pred, strict=True)
        ],
    )
    verdict.write(root / paths.GATE_REPORT)
    write_text(root / paths.GATE_MARKDOWN, verdict.markdown())
    return metrics.confusion_matrix(test.y, pred, len(test.classes))
