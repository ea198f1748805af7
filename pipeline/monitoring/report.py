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
from pipeline.monitoring import drift, shards
from pipeline.monitoring.shadow_report import shadow_summary
from pipeline.registry import runs
from pipeline.registry.store import Store, connect, model_uri


def window_of(rows: dict) -> drift.Window:
    return drift.Window(
        rows["pred"].astype(np.int64), rows["confidence"], drift.input_stats(rows["x"]), rows["embedding"]
    )


def reference_of(store: Store, name: str, version: str) -> drift.Reference:
    ref = store.read_model_dir(model_uri(name, version), drift.read_reference)
    if ref is None:
        raise LookupError(f"{name} v{version} carries no drift reference (trained before tollgate kept one)")
    return ref


def check(
    params: Params, root: Path, store: Store
) -> tuple[dict, drift.Reference | None, drift.Window | None]:
    """(report, reference, window) for the newest live samples of the version that served them last."""
    cfg, name = params.monitor, params.registry.model_name
    folder = root / cfg.folder
    newest = shards.read_latest(folder, shards.SAMPLES, 1)
    report: dict = {"model": name, "checked_at": time.time(), "folder": cfg.folder}
    if not newest:
        return (
            {**report, "drift": None, "samples": 0, "reason": f"no live samples in {cfg.folder}"},
            None,
            None,
        )
    version = str(newest["version"][-1])
    rows = shards.read_latest(folder, shards.SAMPLES, cfg.window, version)
    reference = reference_of(store, name, version)
    window = window_of(rows)
    report.update(version=version, window={"from": float(rows["time"][0]), "to": float(rows["time"][-1])})
    report.update(drift.compare(reference, window, cfg))
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
    ]
    for name, c in report["checks"].items():
        mark = "DRIFT" if c["drift"] else "ok"
        lines.append(
            f"  {name:<10} effect {c['effect']:.4f} (threshold {c['threshold']}) p {c['p_value']:.2e}  {mark}"
        )
    return "\n".join(lines)


def shadow(params: Params, root: Path) -> dict:
    report = shadow_summary(root / params.monitor.folder, root / params.data.feedback)
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
    return (
        "<!doctype html><meta charset=utf-8><title>tollgate monitor</title>"
        f"<h1>{escape(report['model'])} v{escape(str(report.get('version', '-')))}: {verdict}</h1>"
        f"<p>{report.get('samples', 0)} live samples. {escape(report.get('reason', ''))}</p>"
        "<table border=1 cellpadding=4><tr><th>check</th><th>effect</th><th>threshold</th><th>p-value</th>"
        f"<th>result</th></tr>{rows}</table>{image}\n"
    )
