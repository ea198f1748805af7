"""The one way an image file becomes model input, for training (prepare) and serving (/predict) alike.

If the two paths decoded, converted or resized differently, the served model would see other pixels than it
was trained on (training/serving skew); both call `to_pixels`, and a test feeds the same files through both.
"""

from __future__ import annotations

import numpy as np


def to_pixels(img, height: int, width: int, channels: int) -> np.ndarray:
    """A PIL image as uint8 (height, width, channels): grey (1) or RGB (3), alpha dropped, bilinear resize."""
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).reshape(height, width, channels)


def channel_count(img) -> int:
    """Colour channels a file carries, alpha not counted (it is dropped when converting)."""
    bands = [b for b in img.getbands() if b != "A"]
    return 3 if img.mode == "P" else len(bands)


class TooLarge(ValueError):
    """The image's header declares more pixels than allowed: it is never decoded."""


def decode(data: bytes, height: int, width: int, channels: int, max_pixels: int) -> np.ndarray:
    """Image file bytes (PNG, JPEG, ...) as model pixels; the size is checked from the header before the
    pixels are unpacked, so a decompression bomb costs nothing. Raises TooLarge, or ValueError for bytes
    that are not an image."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise TooLarge(f"image has {img.width}x{img.height} pixels; at most {max_pixels} allowed")
            return to_pixels(img, height, width, channels)
    except Image.DecompressionBombError:  # PIL's own guard, for sizes it refuses to even describe
        raise TooLarge(f"image has too many pixels; at most {max_pixels} allowed") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # PIL raises these for bad bytes
        raise ValueError(f"not a decodable image: {err}") from None
