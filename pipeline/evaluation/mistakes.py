"""What the model gets wrong, as a picture a person can look at: the most confident mistakes of the most
confused class pairs of the test split, each beside its Grad-CAM heat map (Captum's `LayerGradCam` on the
network's last convolution, for the class the model wrongly chose: where it looked to decide)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

TILE = 112  # pixels per shown image: small inputs are enlarged to be seen, large ones reduced


def confused_pairs(cm: np.ndarray, limit: int) -> list[tuple[int, int, int]]:
    """(actual, predicted, count) of the `limit` most frequent mistakes, most frequent first."""
    off = [(int(a), int(p), int(cm[a, p])) for a, p in zip(*np.nonzero(cm), strict=True) if a != p]
    return sorted(off, key=lambda t: (-t[2], t[0], t[1]))[:limit]


def worst_mistakes(
    probs: np.ndarray, y: np.ndarray, pairs: list[tuple[int, int, int]], per_pair: int
) -> list[int]:
    """Test indices of the most confident wrong answers within each pair, pair by pair."""
    pred = probs.argmax(1)
    chosen: list[int] = []
    for actual, predicted, _ in pairs:
        idx = np.flatnonzero((y == actual) & (pred == predicted))
        chosen.extend(idx[np.argsort(-probs[idx, predicted], kind="stable")][:per_pair].tolist())
    return chosen


def _last_map(model: nn.Module, x: torch.Tensor, min_side: int = 4) -> nn.Module | None:
    """The last convolution whose output map is at least `min_side` on each side: Grad-CAM's usual layer,
    except where small inputs shrink the last maps to 1x1 or 2x2 (a 32-pixel image in a ResNet), which
    cannot say where anything is."""
    sides: dict[nn.Module, int] = {}

    def seen(module: nn.Module, _args, out: torch.Tensor) -> None:  # returns None: the output stays as is
        sides.setdefault(module, min(out.shape[-2:]))

    hooks = [m.register_forward_hook(seen) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for hook in hooks:
            hook.remove()
    large = [m for m, side in sides.items() if side >= min_side]
    return large[-1] if large else None


def gradcam(model: nn.Module, pixels: np.ndarray, targets: list[int]) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in 0..1 for `targets`, at the input's resolution. Zeros for a network
    without convolutions (nothing to localise)."""
    if not len(pixels):
        return np.zeros(pixels.shape[:3], dtype=np.float32)
    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(pixels), dtype=torch.float32, device=device)
    layer = _last_map(model, x)
    if layer is None:
        return np.zeros(pixels.shape[:3], dtype=np.float32)
    from captum.attr import LayerAttribution, LayerGradCam

    with torch.enable_grad():
        attr = LayerGradCam(model, layer).attribute(
            x, target=torch.as_tensor(targets, device=device), relu_attributions=True
        )
        maps = LayerAttribution.interpolate(attr, tuple(pixels.shape[1:3]), interpolate_mode="bilinear")
    maps = maps[:, 0].detach().float().cpu().numpy()
    peak = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1)
    return np.where(peak > 0, maps / np.where(peak > 0, peak, 1), 0).astype(np.float32)


def _heat_colours(heat: np.ndarray) -> np.ndarray:
    """A blue-to-red colour scale (jet-like) of 0..1 values: (H, W, 3) uint8."""
    rgb = [np.clip(1.5 - np.abs(4 * heat - k), 0, 1) for k in (3, 2, 1)]
    return (np.stack(rgb, axis=-1) * 255).astype(np.uint8)


def _tile(pixels: np.ndarray):
    from PIL import Image

    img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).convert("RGB")
    small = max(img.size) < TILE
    return img.resize((TILE, TILE), Image.Resampling.NEAREST if small else Image.Resampling.BILINEAR)


def grid(pixels: np.ndarray, heat: np.ndarray, captions: list[str], title: str):
    """Rows of [image | image under its heat map] with a caption each, under a title: a PIL image."""
    from PIL import Image, ImageDraw

    cols, caption_h, title_h, pad = 2, 28, 30, 8
    cell_w = cols * TILE + pad
    per_row = 3
    rows = max(1, -(-len(captions) // per_row))
    sheet = Image.new("RGB", (per_row * cell_w + pad, title_h + rows * (TILE + caption_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 8), title, fill="black")
    if not captions:
        draw.text((pad, title_h + 8), "no mistakes on the test split", fill="black")
    for i, (image, h, caption) in enumerate(zip(pixels, heat, captions, strict=True)):
        x0 = pad + (i % per_row) * cell_w
        y0 = title_h + (i // per_row) * (TILE + caption_h + pad)
        plain = _tile(image)
        overlay = Image.blend(plain, _tile(_heat_colours(h)[..., :3]), 0.45)
        sheet.paste(plain, (x0, y0))
        sheet.paste(overlay, (x0 + TILE, y0))
        for j, line in enumerate(caption.split("\n")[:2]):
            draw.text((x0, y0 + TILE + 2 + 12 * j), line, fill="black")
    return sheet


def write_grid(
    path: Path, model: nn.Module, x: np.ndarray, probs: np.ndarray, y: np.ndarray, classes: list[str],
    pairs: list[tuple[int, int, int]], per_pair: int,
) -> list[int]:  # fmt: skip
    """The mistakes picture as a PNG at `path` (written beside, then renamed); returns the indices shown."""
    chosen = worst_mistakes(probs, y, pairs, per_pair)
    shown = np.asarray(x[chosen]) if chosen else np.zeros((0, *x.shape[1:]), dtype=np.uint8)
    predicted = [int(probs[i].argmax()) for i in chosen]
    heat = gradcam(model, shown, predicted)
    captions = [
        f"#{i}: {classes[y[i]]} taken for\n{classes[p]} ({probs[i, p]:.2f})"
        for i, p in zip(chosen, predicted, strict=True)
    ]
    title = (
        "Most confident mistakes of the most confused pairs (test split); right: Grad-CAM of the chosen class"
    )
    tmp = path.with_name(path.name + ".tmp")
    grid(shown, heat, captions, title).save(tmp, format="PNG")
    tmp.replace(path)
    return chosen
