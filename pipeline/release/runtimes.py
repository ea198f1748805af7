"""The serving artefacts register makes beside the weights when `serve.runtime` asks for more than eager
torch: the ONNX export (and its int8 quantisation for `onnx-int8`), each gated on the test split against the
eager model (`pipeline.evaluation.runtimes`). The asked-for runtime serves if it passes, else torch does;
the choice and the table go into the logged model folder (`runtimes.json`), so every server of that
version makes the same choice without asking anyone.
"""

from __future__ import annotations

import shutil
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


def stage(params: Params, root: Path, out: Path) -> tuple[str, list[RuntimeRow]]:
    """Copy the model folder to `out` and add the asked-for artefacts and the choice. Returns the runtime
    that serves and the gate's rows (none for torch)."""
    shutil.copytree(root / paths.MODEL_DIR, out)
    wanted = params.serve.runtime
    if wanted == runtimes.TORCH:
        return runtimes.TORCH, []
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
    serves = wanted if rows[-1].passed else runtimes.TORCH
    runtimes.write_choice(out, serves, [r.model_dump(mode="json") for r in rows])
    for runtime, file in runtimes.FILES.items():
        if runtime != serves:
            (out / file).unlink(missing_ok=True)  # what does not serve is not shipped
    return serves, rows


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
