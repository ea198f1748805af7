"""evaluate: the candidate's test metrics, speed and behaviour (pipeline/evaluate.py), the @champion
re-scored on the same split, and the gate's verdict. The verdict is data: this stage
succeeds either way, and register and promote read it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import evaluate, paths, tracking
from pipeline import model as model_io
from pipeline.config import Params
from pipeline.data import FEEDBACK, load_split, read_manifest, splits_of
from pipeline.files import load_json, write_csv, write_json, write_text
from pipeline.stages import log, work


def run(params: Params, root: Path) -> dict:
    cfg = params.evaluate
    run_id = load_json(root / paths.TRAIN_REPORT)["run_id"]
    model, meta = model_io.load(root / paths.MODEL_DIR)
    test = load_split(root / paths.PREPARED_DIR, "test")
    feedback = None
    if FEEDBACK in splits_of(read_manifest(root / paths.PREPARED_DIR)):
        feedback = load_split(root / paths.PREPARED_DIR, FEEDBACK)
        feedback = feedback if len(feedback.y) else None
    store = tracking.connect(params, root)

    def probs_of(pixels) -> np.ndarray:
        return model_io.predict_proba(model, pixels).numpy()

    with work():
        quality, pred = evaluate.assess(probs_of, np.asarray(test.x), test.y, test.classes, cfg)
        quality["n_params"] = sum(p.numel() for p in model.parameters())
        quality["model_mb"] = (root / paths.MODEL_DIR / model_io.WEIGHTS).stat().st_size / 1e6
        if feedback is not None:
            quality["feedback_accuracy"] = evaluate.slice_accuracy(probs_of, feedback)
            quality["feedback_images"] = len(feedback.y)
        perf = evaluate.speed_metrics(probs_of, meta["input_shape"], cfg)
        perf["device"] = str(next(model.parameters()).device)
        champion = evaluate.champion_scores(store, params.registry.model_name, test, cfg, feedback)
        verdict = evaluate.gate({**quality, **perf}, test.classes, params.gate, champion)
    verdict.update(
        run_id=run_id, champion_version=champion and champion["version"], data_version=meta["data_version"]
    )
    cm = _persist(root, quality, perf, verdict, test, pred)
    numbers = {
        k: v for k, v in {**quality, **perf}.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    tracking.log_evaluation(
        run_id,
        numbers,
        quality["per_class_recall"],
        {"classes": test.classes, "matrix": cm.tolist()},
        evaluate.confusion_figure(cm, test.classes),
        [root / paths.GATE_REPORT, root / paths.GATE_MARKDOWN],
        evaluate.gate_summary(verdict),
    )
    log(
        f"test accuracy {quality['accuracy']:.4f}, macro-F1 {quality['macro_f1']:.4f}, "
        f"p99 {perf['latency_p99_ms']:.2f} ms; gate "
        + ("PASSED" if verdict["passed"] else "FAILED: " + "; ".join(verdict["reasons"]))
    )
    for warning in verdict["warnings"]:
        log(f"gate warning (not blocking): {warning}")
    return verdict


def _persist(root: Path, quality: dict, perf: dict, verdict: dict, test, pred: np.ndarray) -> np.ndarray:
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
    write_json(root / paths.GATE_REPORT, verdict)
    write_text(root / paths.GATE_MARKDOWN, evaluate.gate_markdown(verdict))
    return evaluate.confusion_matrix(test.y, pred, len(test.classes))
