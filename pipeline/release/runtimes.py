"""The serving artefacts register makes beside the weights when `serve.runtime` asks for more than eager
torch: the ONNX export (and its int8 quantisation for `onnx-int8`), each gated on the test split against the
eager model (`pipeline.evaluation.runtimes`). The asked-for runtime serves if it passes, else torch does;
the choice and the table go into the logged model folder (`runtimes.json`), so every server of that
version makes the same choice without asking anyone.

Building and gating them needs torch (`pipeline.release.artefacts`); a registration on torch, the default,
only copies the folder and never imports it (~1.7 s of a register process's start).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.core import paths
from pipeline.core.config import Params
from pipeline.evaluation.runtimes import RuntimeRow
from pipeline.training import runtimes


def stage(params: Params, root: Path, out: Path) -> tuple[str, list[RuntimeRow]]:
    """Copy the model folder to `out` and add the asked-for artefacts and the choice. Returns the runtime
    that serves and the gate's rows (none for torch)."""
    shutil.copytree(root / paths.MODEL_DIR, out)
    wanted = params.serve.runtime
    if wanted == runtimes.TORCH:
        return runtimes.TORCH, []
    from pipeline.release.artefacts import gated_rows

    rows = gated_rows(params, root, out, wanted)
    serves = wanted if rows[-1].passed else runtimes.TORCH
    runtimes.write_choice(out, serves, [r.model_dump(mode="json") for r in rows])
    for runtime, file in runtimes.FILES.items():
        if runtime != serves:
            (out / file).unlink(missing_ok=True)  # what does not serve is not shipped
    return serves, rows
