"""The one-screen account of the last run, read from the stage outputs (no MLflow or torch import)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.core.files import read_report
from pipeline.evaluation.verdict import Check, Verdict, fmt
from pipeline.release.results import Promotion, Registration


def gate_table(checks: list[Check]) -> list[str]:
    rows = [("check", "value", "threshold", "result", "note")]
    rows += [
        (c.check, fmt(c.value), fmt(c.threshold), "pass" if c.passed else "FAIL", c.detail) for c in checks
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _data_lines(manifest: dict, validation: dict) -> tuple[list[str], bool]:
    """The data and validation lines, and whether training went on from them."""
    sizes = " / ".join(f"{s} {sum(manifest['counts'][s].values())}" for s in ("train", "val", "test"))
    out = [
        f"data        {manifest['source']}, version {manifest['data_version'][:12]} ({sizes}), "
        f"{len(manifest['classes'])} classes, images {'x'.join(map(str, manifest['image_shape']))}"
    ]
    if validation.get("data_version") != manifest["data_version"]:
        return [*out, "validation  not run on this data"], False
    n = len(validation["checks"])
    if not validation["passed"]:
        out.append(
            f"validation  FAILED ({len(validation['failures'])} of {n} expectations); training skipped:"
        )
        return out + [f"  - {f}" for f in validation["failures"]], False
    warnings = validation.get("warnings", [])
    out.append(
        f"validation  passed ({n} expectations, {len(warnings)} warnings; {paths.DATA_DOCS}/index.html)"
    )
    return out + [f"  ! {w}" for w in warnings], True


def _model_lines(root: Path) -> list[str]:
    """Training, metrics, speed: what the stages after validation recorded."""
    train = read_report(root / paths.TRAIN_REPORT)
    metrics = read_report(root / paths.EVAL_METRICS)
    perf = read_report(root / paths.PERF_METRICS)
    out = []
    if train:
        out.append(
            f"training    {train['epochs']} epochs on {train['device']} in {train['wall_s']:.1f}s, "
            f"MLflow run {train['run_id']}"
        )
    if metrics:
        out.append(
            f"metrics     test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
            f"ECE {metrics['ece']:.4f} ({metrics['n_test']} test images, {metrics['n_params']:,} params)"
        )
    if perf:
        out.append(
            f"speed       batch-1 latency p50 {perf['latency_p50_ms']:.2f} ms, "
            f"p99 {perf['latency_p99_ms']:.2f} ms; {perf['throughput_ips']:,.0f} img/s at batch "
            f"{perf['throughput_batch']} on {perf['device']}"
        )
    if (root / paths.MODEL_CARD).is_file():
        out.append(f"model card  {paths.MODEL_CARD}; its worst mistakes, with Grad-CAM: {paths.MISTAKES}")
    return out


def _release_lines(root: Path) -> list[str]:
    """The gate table, the registered version and where @champion went."""
    verdict = Verdict.read(root / paths.GATE_REPORT)
    registration = Registration.read(root / paths.REGISTRATION)
    promotion = Promotion.read(root / paths.PROMOTION)
    out = []
    if verdict:
        out.append("gate        " + verdict.headline())
        out += gate_table(verdict.checks)
        out += [f"  warning (not blocking): {w}" for w in verdict.warnings]
    if registration:
        out.append(
            f"registry    {registration.name} v{registration.version} @challenger"
            if registration.registered
            else "registry    not registered: " + "; ".join(registration.reasons)
        )
    if promotion:
        out.append("promotion   " + promotion.line())
    return out


def render(params: Params, root: Path) -> str:
    manifest = read_report(root / paths.PREPARED_DIR / "manifest.json")
    out = ["", "tollgate: pipeline summary", "=" * 26]
    if not manifest:
        return "\n".join([*out, "nothing prepared yet: run `dvc repro`"])
    data, trained = _data_lines(manifest, read_report(root / paths.VALIDATION_REPORT))
    if not trained:
        return "\n".join(out + data)
    uri = params.mlflow.tracking_uri
    out += data + _model_lines(root) + _release_lines(root)
    out += [
        "",
        "next (after `source .venv/bin/activate`):",
        f"  mlflow ui --backend-store-uri {uri}        # runs, metrics, registered model, aliases",
        "  tollgate serve                                              # HTTP endpoint on @champion",
        "  tollgate samples --out samples                              # a few test images as PNG",
        f"  curl --data-binary @samples/0.png http://{params.serve.host}:{params.serve.port}/predict",
    ]
    return "\n".join(out)


def write_samples(root: Path, out_dir: Path, n: int) -> list[Path]:
    """Save the first `n` test images as PNG, named <index>.png, with their true class in a side file."""
    from PIL import Image

    from pipeline.data.prepared import load_split

    test = load_split(root / paths.PREPARED_DIR, "test")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    labels = {}
    for i in range(min(n, len(test.y))):
        img = test.x[i]
        path = out_dir / f"{i}.png"
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
        labels[path.name] = test.classes[int(test.y[i])]
        written.append(path)
    (out_dir / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    return written
