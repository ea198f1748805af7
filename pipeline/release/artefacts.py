"""The ONNX artefacts `serve.runtime` asks for, built from the eager model in a register process and each
judged on the test split against it (agreement, accuracy, batch-1 p50; `pipeline.evaluation.runtimes`).
`pipeline.release.runtimes` decides from the rows which one serves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.data.prepared import load_split
from pipeline.evaluation.metrics import batch1_latencies_ms
from pipeline.evaluation.runtimes import RuntimeRow, judge, unbuilt
from pipeline.training import model as model_io
from pipeline.training import runtimes
from pipeline.training.onnx_export import export_onnx

CALIBRATION_IMAGES = 256  # training images that set int8's activation ranges


def gated_rows(params: Params, root: Path, out: Path, wanted: str) -> list[RuntimeRow]:
    """Build into `out` (a copy of the model folder) the artefacts up to `wanted` (ONNX, then its int8
    quantisation) and judge each; the last row is `wanted`'s."""
    model, meta = model_io.load(out)
    test = load_split(root / paths.PREPARED_DIR, "test")
    eager = model_io.predict_proba(model, test.x).numpy()
    shape, runs = meta["input_shape"], params.evaluate.timing_runs
    eager_p50 = _eager_p50(model, shape, runs, params.serve.threads)
    rows = []
    for runtime in (runtimes.ONNX, runtimes.INT8)[: 1 + (wanted == runtimes.INT8)]:
        try:
            _build(runtime, model, meta, root, out)
        except Exception as err:  # noqa: BLE001 - an artefact that cannot be made serves nothing
            rows.append(unbuilt(runtime, eager_p50, f"{type(err).__name__}: {err}"))
            continue
        onnx = runtimes.OnnxModel(out / runtimes.FILES[runtime], runtime, params.serve.threads)
        probs = np.concatenate([onnx.predict(test.x[i : i + 256])[0] for i in range(0, len(test.x), 256)])
        p50 = _p50(lambda x, onnx=onnx: onnx.predict(x), shape, runs)
        rows.append(judge(runtime, probs, eager, test.y, p50, eager_p50, params.gate))
    return rows


def _build(runtime: str, model, meta: dict, root: Path, out: Path) -> None:
    if runtime == runtimes.ONNX:
        export_onnx(model, meta["input_shape"], out / runtimes.FILES[runtime])
        return
    train = load_split(root / paths.PREPARED_DIR, "train")
    picks = np.random.default_rng(0).choice(
        len(train.x), min(CALIBRATION_IMAGES, len(train.x)), replace=False
    )
    calibration = np.asarray(train.x[np.sort(picks)])
    runtimes.quantize_int8(out / runtimes.FILES[runtimes.ONNX], calibration, out / runtimes.FILES[runtime])


def _eager_p50(model, shape: list[int], runs: int, threads: int) -> float:
    """Eager torch's batch-1 p50 on the threads a server gives it (`serve.threads`), as each ONNX session is
    measured: on the register process's default threads, eager would race ONNX with twice the cores."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _p50(lambda x: model_io.predict_proba(model, x), shape, runs)
    finally:
        torch.set_num_threads(before)


def _p50(forward, shape: list[int], runs: int) -> float:
    # float32 pixels, as a parsed request hands them to either runtime
    return float(np.percentile(batch1_latencies_ms(forward, shape, runs), 50))
