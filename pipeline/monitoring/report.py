"""`tollgate monitor` and `tollgate shadow`: what the served model meets in live traffic.

`check` compares the newest `monitor.window` samples of the served version with the drift reference that
version was registered with (pipeline/monitoring/drift.py); `run` also writes reports/monitor.json and an
HTML report with plots, and logs a monitoring run to MLflow tagged with the model version it judged.
`shadow` sums up the shadow challenger's records (reports/shadow.json).
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np

from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.core.files import write_json, write_text
from pipeline.data import shards
from pipeline.data.feedback import feedback_labels
from pipeline.monitoring import drift
from pipeline.monitoring.shadow_report import shadow_summary
from pipeline.registry import runs
from pipeline.registry.store import Store, connect, model_uri


def window_of(rows: dict) -> drift.Window:
    return drift.Window(
        rows["pred"].astype(np.int64), rows["confidence"], drift.input_stats(rows["x"]), rows["embedding"]
    )


def reference_and_classes(store: Store, name: str, version: str) -> tuple[drift.Reference, list[str]]:
    """The drift reference a version was registered with, and its classes (one download of its folder)."""
    from pipeline.core.files import load_json
    from pipeline.training.model import META

    def read(folder: Path):
        return drift.read_reference(folder), load_json(folder / META)["classes"]

    try:
        ref, classes = store.read_model_dir(model_uri(name, version), read)
    except drift.DamagedReference as err:
        raise LookupError(
            f"{name} v{version}'s {err}: re-register it (dvc repro) or roll back to another"
        ) from None
    if ref is None:
        raise LookupError(f"{name} v{version} carries no drift reference (trained before tollgate kept one)")
    return ref, classes


def reference_of(store: Store, name: str, version: str) -> drift.Reference:
    return reference_and_classes(store, name, version)[0]


def _measured(rows: dict, feedback: shards.Folder, reference: drift.Reference) -> dict | None:
    """Accuracy on the window's images users labelled (POST /feedback), beside the estimate on the same
    images: how far the label-free estimate is off, where labels say."""
    labels = feedback_labels(feedback)
    truth = [labels.get((str(r), int(i))) for r, i in zip(rows["request"], rows["item"], strict=True)]
    labelled = np.array([t is not None for t in truth])
    if not labelled.any() or reference.correct is None:
        return None
    names = np.array([str(rows["classes"][p]) for p in rows["pred"][labelled]])
    measured = float((names == np.array([t for t in truth if t is not None])).mean())
    estimate = drift.estimate_accuracy(reference, rows["confidence"][labelled])["estimate"]
    return {
        "labelled": int(labelled.sum()),
        "measured": measured,
        "estimate": estimate,
        "error": estimate - measured,
    }


def check(
    params: Params, root: Path, store: Store
) -> tuple[dict, drift.Reference | None, drift.Window | None]:
    """(report, reference, window) for the newest live samples of the version that served them last."""
    cfg, name = params.monitor, params.registry.model_name
    folder = shards.open_folder(cfg.folder, root)
    reading = shards.Reading()
    newest = shards.read_latest(folder, shards.SAMPLES, 1, reading=reading)
    report: dict = {"model": name, "checked_at": time.time(), "folder": folder.where}
    if not newest:
        reason = f"no live samples in {folder.where}"
        return {**report, "drift": None, "retrain": None, "samples": 0, "reason": reason,
                "damaged_shards": reading.damaged}, None, None  # fmt: skip
    version = str(newest["version"][-1])
    rows = shards.read_latest(folder, shards.SAMPLES, cfg.window, version, reading)
    reference, rows["classes"] = reference_and_classes(store, name, version)
    window = window_of(rows)
    report.update(version=version, window={"from": float(rows["time"][0]), "to": float(rows["time"][-1])})
    report.update(drift.compare(reference, window, cfg, multivariate=True))
    if report.get("accuracy") is not None:
        report["accuracy"]["measured"] = _measured(
            rows, shards.open_folder(params.data.feedback, root), reference
        )
    report["damaged_shards"] = reading.damaged
    return report, reference, window


def run(params: Params, root: Path) -> dict:
    """Check, write reports/monitor.json and reports/monitor.html, and log the monitoring run."""
    store = connect(params, root)
    report, reference, window = check(params, root, store)
    html = render_html(report, reference, window)
    write_text(root / paths.MONITOR_HTML, html)
    if report["drift"] is not None:
        report["mlflow_run_id"] = runs.log_monitoring(
            store, params.registry.model_name, report, [root / paths.MONITOR_HTML]
        )
    write_json(root / paths.MONITOR_REPORT, report)
    return report


def summary(report: dict) -> str:
    if report["drift"] is None:
        return f"monitor: no verdict ({report.get('reason', '')})"
    lines = [
        f"monitor: {report['model']} v{report['version']}, {report['samples']} samples: "
        + ("DRIFT" if report["drift"] else "no drift")
        + ("; RETRAIN: " if report["retrain"] else "; no retraining: ")
        + report["retrain_reason"]
    ]
    acc = report.get("accuracy")
    if acc:
        lines.append(
            f"  accuracy   estimated {acc['estimate']:.4f} [{acc['low']:.4f}, {acc['high']:.4f}] "
            f"({acc['method']}; {acc['reference']:.4f} at training)"
        )
        if acc.get("measured"):
            m = acc["measured"]
            lines.append(
                f"             measured {m['measured']:.4f} on {m['labelled']} labelled images "
                f"(estimate there {m['estimate']:.4f}, off by {m['error']:+.4f})"
            )
    for name, c in report["checks"].items():
        mark = "DRIFT" if c["drift"] else "ok"
        lines.append(
            f"  {name:<10} effect {c['effect']:.4f} (threshold {c['threshold']}) p {c['p_value']:.2e}  {mark}"
        )
    if report.get("damaged_shards"):
        lines.append(
            f"  skipped {len(report['damaged_shards'])} damaged shard(s): {report['damaged_shards'][0]}"
        )
    return "\n".join(lines)


def shadow(params: Params, root: Path) -> dict:
    report = shadow_summary(
        shards.open_folder(params.monitor.folder, root), shards.open_folder(params.data.feedback, root)
    )
    write_json(root / paths.SHADOW_REPORT, report)
    return report


def _figure(reference: drift.Reference, window: drift.Window):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    k = len(reference.prior)
    live_prior = np.bincount(window.pred, minlength=k)[:k] / max(len(window), 1)
    axes[0].bar(np.arange(k) - 0.2, reference.prior, 0.4, label="reference")
    axes[0].bar(np.arange(k) + 0.2, live_prior, 0.4, label="live")
    axes[0].set(title="predicted classes", xlabel="class index")
    panels = [
        (reference.confidence, window.confidence, "confidence (top probability)"),
        (reference.inputs[:, 0], window.inputs[:, 0], "input: pixel mean per image"),
        (
            reference.projected[:, 0],
            reference.project(window.embeddings)[:, 0],
            "embedding: 1st principal axis",
        ),
    ]
    for ax, (ref, cur, title) in zip(axes[1:], panels, strict=True):
        bins = np.histogram_bin_edges(np.concatenate([ref, cur]), bins=30)
        ax.hist(ref, bins, density=True, alpha=0.5, label="reference")
        ax.hist(cur, bins, density=True, alpha=0.5, label="live")
        ax.set(title=title)
    axes[0].legend()
    fig.tight_layout()
    return fig


def render_html(report: dict, reference: drift.Reference | None, window: drift.Window | None) -> str:
    """The report as one self-contained HTML page: verdict, a row per check, and the distributions."""
    from html import escape

    rows = "".join(
        f"<tr><td>{escape(n)}</td><td>{c['effect']:.4f}</td><td>{c['threshold']}</td>"
        f"<td>{c['p_value']:.2e}</td><td>{'DRIFT' if c['drift'] else 'ok'}</td></tr>"
        for n, c in report.get("checks", {}).items()
    )
    image = ""
    if reference is not None and window is not None and len(window):
        buf = io.BytesIO()
        _figure(reference, window).savefig(buf, format="png", dpi=80)
        encoded = base64.b64encode(buf.getvalue()).decode()
        image = f'<img alt="distributions" src="data:image/png;base64,{encoded}">'
    verdict = {None: "no verdict", True: "DRIFT", False: "no drift"}[report["drift"]]
    acc = report.get("accuracy")
    estimate = (
        f"<p>Estimated accuracy {acc['estimate']:.4f} (95 % interval {acc['low']:.4f} to {acc['high']:.4f}; "
        f"{escape(acc['method'])}), {acc['reference']:.4f} at training. "
        f"Retrain: {'yes' if report['retrain'] else 'no'} ({escape(report['retrain_reason'])}).</p>"
        if acc
        else ""
    )
    return (
        "<!doctype html><meta charset=utf-8><title>tollgate monitor</title>"
        f"<h1>{escape(report['model'])} v{escape(str(report.get('version', '-')))}: {verdict}</h1>"
        f"<p>{report.get('samples', 0)} live samples. {escape(report.get('reason', ''))}</p>{estimate}"
        "<table border=1 cellpadding=4><tr><th>check</th><th>effect</th><th>threshold</th><th>p-value</th>"
        f"<th>result</th></tr>{rows}</table>{image}\n"
    )
