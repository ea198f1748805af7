"""The model card: what a registered version is, what it was trained on, how it scores, where it fails and
what not to use it for, in markdown (the layout of Hugging Face model cards). Written by evaluate from the
figures it has just measured; register makes it the version's description and logs it with the picture
of its mistakes."""

from __future__ import annotations

import numpy as np

from pipeline.data.images import interpolation_of
from pipeline.evaluation.verdict import Verdict
from pipeline.monitoring.drift import wilson_interval
from pipeline.training.model_folder import backbone_name

MISTAKES_PNG = "mistakes.png"  # the picture's name beside the card, in reports/ and in the run's artifacts


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"  # None: no epoch ran (train.epochs 0)


def _details(meta: dict, manifest: dict, quality: dict, train: dict) -> list[str]:
    h, w, c = meta["input_shape"]
    start = meta.get("pretrained", {"source": "none"})
    origin = (
        "trained from scratch"
        if start["source"] == "none"
        else f"fine-tuned from {start['source']} weights `{start['weights']}` "
        f"(sha256 {str(start.get('sha256'))[:12]})"
    )
    return [
        "## Model details",
        "",
        f"- **Backbone**: `{backbone_name(meta)}`, {origin}; {quality['n_params']:,} parameters, "
        f"{quality['model_mb']:.1f} MB of weights.",
        f"- **Input**: uint8 pixels (N, {h}, {w}, {c}), {'RGB' if c == 3 else 'grey'}; images of any size "
        f"are resized as in training ({interpolation_of(meta)}). Normalisation is inside the model.",
        f"- **Output**: probabilities over {len(meta['classes'])} classes: {', '.join(meta['classes'][:20])}"
        + (" …" if len(meta["classes"]) > 20 else "")
        + ".",
        f"- **Training**: {train['epochs']} epochs on {train['device']} (best epoch {train['best_epoch']}), "
        f"validation accuracy {_figure(train['val_accuracy'])}; MLflow run `{train['run_id']}`.",
        "",
        "## Intended use",
        "",
        f"Sorting images like those of its training data (`{manifest['source']}`) into the classes "
        "above. Out of scope: images of other kinds or of classes it was not trained on — it always answers "
        "one of its classes, however unlike the input. In production, `tollgate monitor` compares live "
        "inputs with the training reference and estimates live accuracy.",
        "",
    ]


def _data(manifest: dict) -> list[str]:
    counts = manifest["counts"]
    splits = [s for s in ("train", "val", "test", "feedback") if s in counts]
    rows = [
        f"| {c} | " + " | ".join(str(counts[s].get(c, 0)) for s in splits) + " |" for c in manifest["classes"]
    ]
    return [
        "## Training data",
        "",
        f"`{manifest['source']}`, data version `{manifest['data_version']}`; images per class and split:",
        "",
        "| class | " + " | ".join(splits) + " |",
        "|---|" + "---|" * len(splits),
        *rows,
        "",
    ]


def _evaluation(
    quality: dict, classes: list[str], pairs: list[tuple[int, int, int]], cm: np.ndarray
) -> list[str]:
    n = quality["n_test"]
    low, high = wilson_interval(quality["accuracy"], n)
    lines = [
        "## Evaluation (test split)",
        "",
        f"Accuracy **{quality['accuracy']:.4f}** (95% interval {low:.3f}–{high:.3f} over {n} images), "
        f"macro-F1 {quality['macro_f1']:.4f}, calibration error (ECE) {quality['ece']:.4f}.",
        "",
        "| class | precision | recall |",
        "|---|---|---|",
        *(
            f"| {c} | {quality['per_class_precision'][c]:.3f} | {quality['per_class_recall'][c]:.3f} |"
            for c in classes
        ),
        "",
        "**Most confused pairs** (actual → predicted):",
        "",
    ]
    if not pairs:
        return [*lines, "none: every test image is classified correctly.", ""]
    lines += ["| actual | predicted | images | share of actual |", "|---|---|---|---|"]
    for a, p, count in pairs:
        lines.append(f"| {classes[a]} | {classes[p]} | {count} | {count / max(cm[a].sum(), 1):.1%} |")
    return [*lines, "", f"![Worst mistakes with Grad-CAM heat maps]({MISTAKES_PNG})", ""]


def _behaviour(quality: dict) -> list[str]:
    lines = ["## Behavioural checks", ""]
    if "shift_stability" in quality:
        lines.append(
            f"- Predictions unchanged under a small shift: {quality['shift_stability']:.1%} of test images."
        )
    if "flip_stability" in quality:
        lines.append(f"- Unchanged under a horizontal flip: {quality['flip_stability']:.1%}.")
    if "feedback_accuracy" in quality:
        lines.append(f"- Accuracy on labelled live feedback: {quality['feedback_accuracy']:.4f}.")
    return [*lines, ""] if len(lines) > 2 else []


def _limitations(quality: dict, classes: list[str], meta: dict, max_ece: float) -> list[str]:
    worst = min(classes, key=lambda c: quality["per_class_recall"][c])
    notes = [f"- Weakest class: `{worst}` (recall {quality['per_class_recall'][worst]:.3f})."]
    if quality["n_test"] < 1000:
        notes.append(
            f"- Figures come from {quality['n_test']} test images: differences of a point or two between "
            "versions are within noise (the gate's paired test says which are not)."
        )
    if quality["ece"] > max_ece:
        notes.append(
            f"- Confidences are not calibrated (ECE {quality['ece']:.3f}): do not read them as probabilities."
        )
    h, w, _ = meta["input_shape"]
    notes.append(f"- Inputs are resized to {h}x{w}: detail finer than that is not seen.")
    if meta.get("pretrained", {}).get("source", "none") != "none":
        notes.append("- Pretrained weights carry their publisher's licence and biases.")
    return ["## Limitations", "", *notes, ""]


def model_card(
    meta: dict, manifest: dict, quality: dict, train: dict, verdict: Verdict, cm: np.ndarray,
    pairs: list[tuple[int, int, int]], max_ece: float,
) -> str:  # fmt: skip
    """The card as markdown (every figure from this evaluation; the picture is MISTAKES_PNG beside it)."""
    classes = meta["classes"]
    lines = [
        f"# Model card: {backbone_name(meta)} on `{manifest['source']}`",
        "",
        f"Gate: **{verdict.headline()}**. Data version `{manifest['data_version']}`.",
        "",
        *_details(meta, manifest, quality, train),
        *_data(manifest),
        *_evaluation(quality, classes, pairs, cm),
        *_behaviour(quality),
        verdict.markdown().strip(),  # its own "## Gate: ..." heading
        "",
        *_limitations(quality, classes, meta, max_ece),
    ]
    return "\n".join(lines)
