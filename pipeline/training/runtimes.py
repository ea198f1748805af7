"""The model in other runtimes than eager torch: an ONNX export (made by `onnx_export`, the one part that
needs torch) and its int8 quantisation, and the ONNX Runtime session that serves either. Nothing here
imports torch, so a server answering on ONNX Runtime never loads it.

Both take NHWC pixels in 0..255 as float32, exactly what the eager model is handed once a request is
parsed (a uint8 graph input would round fractional values), with the normalisation in the graph, and give
the class probabilities and the penultimate layer's output, so a server on ONNX Runtime still feeds drift
monitoring. Whether an artefact may serve is not decided here: `pipeline.evaluation.runtimes` gates it on
the test split, and the choice is written beside the weights (`runtimes.json`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.core import failpoints
from pipeline.core.files import load_json, write_json

TORCH, ONNX, INT8 = "torch", "onnx", "onnx-int8"
FILES = {ONNX: "model.onnx", INT8: "model.int8.onnx"}
CHOICE = "runtimes.json"  # beside model.pt: {"serves": <runtime>, "rows": the gate's table}


def quantize_int8(onnx_path: Path, calibration: np.ndarray, path: Path, batch: int = 32) -> None:
    """Static int8 quantisation by ONNX Runtime (QDQ, per-channel weights), its activation ranges
    calibrated on `calibration` (training images: never the test split the gate measures on)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator = iter(range(0, len(calibration), batch))

        def get_next(self) -> dict | None:
            start = next(self.batches, None)
            return (
                None
                if start is None
                else {"pixels": np.asarray(calibration[start : start + batch], dtype=np.float32)}
            )

    prepared = path.with_suffix(".pre.onnx")
    try:
        # torch's graph carries shapes already; ONNX Runtime's symbolic inference trips on its Reshapes.
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        prepared.unlink(missing_ok=True)


class OnnxModel:
    """One ONNX Runtime session on CPU, called like `predict_with_embeddings`."""

    def __init__(self, path: Path, runtime: str, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's choice, one per physical core
        options.log_severity_level = 3  # its warnings about QDQ node placement are not the user's business
        self.runtime = runtime
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, embeddings = self.session.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})
        if self.runtime == INT8 and failpoints.armed("runtime:int8-disagrees"):
            probs = np.roll(probs, 1, axis=1)  # every prediction moves to the next class
        return probs, embeddings


def chosen(folder: Path) -> str:
    """The runtime the gate let serve the model in `folder` (torch when nothing else was exported)."""
    path = folder / CHOICE
    return load_json(path)["serves"] if path.exists() else TORCH


def write_choice(folder: Path, serves: str, rows: list[dict]) -> None:
    write_json(folder / CHOICE, {"serves": serves, "rows": rows})


def load(folder: Path, threads: int = 0) -> OnnxModel | None:
    """The ONNX Runtime session the folder's choice names, or None when it serves on torch."""
    runtime = chosen(folder)
    return None if runtime == TORCH else OnnxModel(folder / FILES[runtime], runtime, threads)
