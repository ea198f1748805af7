"""Eager torch to ONNX: the graph `serve.runtime: onnx` serves and int8 quantisation starts from
(pipeline/training/runtimes.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.training.model import Classifier, last_linear


class _WithEmbeddings(nn.Module):
    """Probabilities and what the last linear layer reads, as two graph outputs."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model
        self.head = last_linear(model)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []
        hook = self.head.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
        try:
            logits = self.model(pixels)
        finally:
            hook.remove()
        return torch.softmax(logits, dim=1), seen[0]


def export_onnx(model: Classifier, input_shape: list[int], path: Path) -> None:
    """torch.export's graph of `model` (dynamo, the default exporter since PyTorch 2.9) as ONNX, with a
    dynamic batch dimension."""
    example = torch.zeros(2, *input_shape, dtype=torch.float32)
    program = torch.onnx.export(
        _WithEmbeddings(model.cpu().eval()),
        (example,),
        dynamo=True,
        input_names=["pixels"],
        output_names=["probabilities", "embeddings"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    program.save(str(path))
