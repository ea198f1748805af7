"""The gate of a serving artefact (ONNX, int8 ONNX) against the eager model it was made from, on the test
split: it serves only if it predicts the same classes (top-1 agreement ≥ `gate.min_agreement`), loses no
more accuracy than `gate.max_quantized_drop`, and answers one image faster (batch-1 p50) than eager torch
on this machine. int8 is slower than fp32 on some CPUs and models: measured, never assumed.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.config import GateConfig
from pipeline.core.reports import Report


class RuntimeRow(Report):
    runtime: str
    agreement: float | None  # share of test images given the eager model's class
    accuracy: float | None
    accuracy_drop: float | None  # eager accuracy minus this one's
    p50_ms: float | None  # batch-1 latency, this runtime
    eager_p50_ms: float
    passed: bool
    reasons: list[str]


def judge(runtime: str, probs: np.ndarray, eager: np.ndarray, labels: np.ndarray, p50_ms: float,
          eager_p50_ms: float, gate: GateConfig) -> RuntimeRow:  # fmt: skip
    """The row of `runtime`, whose test-split probabilities are `probs` (the eager model's: `eager`)."""
    agreement = float((probs.argmax(1) == eager.argmax(1)).mean())
    accuracy = float((probs.argmax(1) == labels).mean())
    drop = float((eager.argmax(1) == labels).mean()) - accuracy
    reasons = []
    if agreement < gate.min_agreement:
        reasons.append(f"agreement {agreement:.4f} < gate.min_agreement {gate.min_agreement:g}")
    if drop > gate.max_quantized_drop:
        reasons.append(f"accuracy drop {drop:.4f} > gate.max_quantized_drop {gate.max_quantized_drop:g}")
    if p50_ms >= eager_p50_ms:
        reasons.append(f"batch-1 p50 {p50_ms:.3f} ms is not faster than eager torch's {eager_p50_ms:.3f} ms")
    return RuntimeRow(runtime=runtime, agreement=agreement, accuracy=accuracy, accuracy_drop=drop,
                      p50_ms=p50_ms, eager_p50_ms=eager_p50_ms, passed=not reasons,
                      reasons=reasons)  # fmt: skip


def unbuilt(runtime: str, eager_p50_ms: float, error: str) -> RuntimeRow:
    """The row of an artefact that could not be made (an operator the exporter lacks, say)."""
    return RuntimeRow(runtime=runtime, agreement=None, accuracy=None, accuracy_drop=None, p50_ms=None,
                      eager_p50_ms=eager_p50_ms, passed=False, reasons=[f"not built: {error}"])  # fmt: skip


def markdown(rows: list[RuntimeRow], serves: str) -> str:
    """The runtimes' table for the version's description: each row, and which one serves."""
    lines = [
        f"## Serving runtime: {serves}",
        "",
        "| runtime | agreement | accuracy drop | batch-1 p50 ms | eager p50 ms | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        result = "pass" if r.passed else "**FAIL**: " + "; ".join(r.reasons)
        lines.append(
            f"| {r.runtime} | {_f(r.agreement)} | {_f(r.accuracy_drop)} | {_f(r.p50_ms)} "
            f"| {r.eager_p50_ms:.3f} | {result} |"
        )
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"
