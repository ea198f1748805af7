"""The one way an image file becomes model input, for training (prepare) and serving (/predict) alike.

If the two paths decoded, converted or resized differently, the served model would see other pixels than it
was trained on (training/serving skew); both call `to_pixels`, and a test feeds the same files through both.
"""

from __future__ import annotations

import numpy as np

INTERPOLATIONS = ("bilinear", "bicubic")


def interpolation_of(meta: dict) -> str:
    # model.json and manifests from before data.interpolation: everything was resized bilinearly
    return meta.get("interpolation", "bilinear")


def to_pixels(img, height: int, width: int, channels: int, interpolation: str) -> np.ndarray:
    """A PIL image as uint8 (height, width, channels): grey (1) or RGB (3), alpha dropped, resized with
    `interpolation` (data.interpolation, recorded in the manifest and model.json)."""
    from PIL import Image

    if img.format == "JPEG" and (img.width >= 2 * width or img.height >= 2 * height):
        # The JPEG decoder scales by 1/2, 1/4 or 1/8 while decoding (never below the target size): a
        # 4000-pixel photo bound for 224 decodes about 8x faster; serving calls this too, so pixels agree.
        img.draft("L" if channels == 1 else "RGB", (width, height))
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling[interpolation.upper()])
    return np.asarray(img, dtype=np.uint8).reshape(height, width, channels)


def channel_count(img) -> int:
    """Colour channels a file carries, alpha not counted (it is dropped when converting)."""
    bands = [b for b in img.getbands() if b != "A"]
    return 3 if img.mode == "P" else len(bands)


class TooLarge(ValueError):
    """The image's header declares more pixels than allowed: it is never decoded."""


def decode(
    data: bytes, height: int, width: int, channels: int, max_pixels: int, interpolation: str
) -> np.ndarray:
    """Image file bytes (PNG, JPEG, ...) as model pixels; the size is checked from the header before the
    pixels are unpacked, so a decompression bomb costs nothing. Raises TooLarge, or ValueError for bytes
    that are not an image."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise TooLarge(f"image has {img.width}x{img.height} pixels; at most {max_pixels} allowed")
            return to_pixels(img, height, width, channels, interpolation)
    except Image.DecompressionBombError:  # PIL's own guard, for sizes it refuses to even describe
        raise TooLarge(f"image has too many pixels; at most {max_pixels} allowed") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # PIL raises these for bad bytes
        raise ValueError(f"not a decodable image: {err}") from None
