"""Request protocols: bodies read within bounds, then parsed into model pixels (N, H, W, C) float32.

MLflow scoring (`{"inputs" | "instances": pixels}`) and image files (raw bytes or a multipart upload)
decoded by `pipeline.data.images`, the function prepare uses; the Open Inference Protocol v2 is
`pipeline.serving.oip`, on the same helpers.
Everything here is plain functions over bytes and parsed JSON, so it is tested without a server; a bad
request raises `Refused` with the HTTP status and a message saying what was expected.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import orjson

from pipeline.data.images import TooLarge, decode, interpolation_of

# The last is what `curl --data-binary @digit.png` sends by default; the decoder checks the bytes anyway.
IMAGE_TYPES = ("image/png", "image/jpeg", "application/octet-stream", "application/x-www-form-urlencoded")


class Refused(Exception):
    """A request the server will not take: `status` is the HTTP code, `detail` says what was expected."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def error_body(path: str, status: int, message: str) -> dict:
    """An error as each protocol's clients read it: `{"error"}` on the Open Inference Protocol's routes
    (Triton's and KServe's clients raise with its text), MLflow's `{"error_code", "message"}` beside
    `{"detail"}` elsewhere."""
    if path == "/v2" or path.startswith("/v2/"):
        return {"error": message}
    code = {404: "RESOURCE_DOES_NOT_EXIST", 503: "TEMPORARILY_UNAVAILABLE"}
    return {"error_code": code.get(status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST"),
            "message": message, "detail": message}  # fmt: skip


def media_type(headers) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(headers, chunks: AsyncIterator[bytes], max_body: int) -> bytes:
    """The request body, counted as it arrives: refused (413) as soon as it is known to exceed `max_body`,
    from a declared Content-Length before anything is read."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise Refused(413, f"body of {declared} bytes; at most {max_body} allowed")
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_body:
            raise Refused(413, f"body larger than {max_body} bytes")
        parts.append(chunk)
    if size == 0:
        raise Refused(400, "empty body")
    return b"".join(parts)


def parse_json(headers, body: bytes):
    kind = media_type(headers)
    if kind != "application/json":
        raise Refused(415, f"content type must be application/json, got {kind or 'none'}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Refused(400, "body must be valid JSON (strict: no NaN or Infinity literals)") from None


def numbers(data, what: str) -> np.ndarray:
    """A nested list of JSON numbers as an array; strings, booleans, nulls and ragged lists refused."""
    try:
        x = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise Refused(400, f"{what} must be a rectangular array of numbers") from None
    if x.dtype.kind not in "iuf":
        raise Refused(400, f"{what} must be a rectangular array of numbers (got {x.dtype.kind!r} values)")
    return x


def check_batch(x: np.ndarray, shape: list[int], what: str) -> np.ndarray:
    if x.ndim == len(shape):  # a single image without the batch axis
        x = x[None]
    if list(x.shape[1:]) != list(shape) or len(x) == 0:
        dims = ", ".join(map(str, shape))
        raise Refused(400, f"{what} must have shape [N, {dims}] or [{dims}] (N >= 1), got {list(x.shape)}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
        x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise Refused(400, f"{what} must be finite numbers (no NaN or inf)")
    return x


def _depth(data) -> int:
    depth = 0
    while isinstance(data, list) and data:
        depth, data = depth + 1, data[0]
    return depth


def cap(n: int, max_images: int) -> None:
    if n > max_images:
        raise Refused(413, f"{n} images in one request; at most {max_images} (serve.max_request_images)")


def cap_before_parsing(body: bytes, max_images: int) -> None:
    """Refuse a scoring body with too many images before parsing it. A JSON parse holds the GIL from start to
    end (a 10 MB body: long enough to stall every other request under load); counting the arrays two deep
    (the images of {"inputs": [image, ...]}) on the raw bytes with numpy lets other threads run. Brackets
    inside strings could only add to the count, and the full parse still applies the exact cap."""
    raw = np.frombuffer(body, dtype=np.uint8)
    opens = raw == ord("[")
    depth = np.cumsum(opens.view(np.int8) - (raw == ord("]")).view(np.int8), dtype=np.int32)
    cap(int(np.count_nonzero(opens & (depth == 2))), max_images)


def pixels_from_json(payload: object, shape: list[int], max_images: int) -> np.ndarray:
    """MLflow scoring protocol: {"inputs": tensor} or {"instances": [tensor, ...]}."""
    if not isinstance(payload, dict):
        raise Refused(400, 'expected a JSON object {"inputs": [...]} or {"instances": [...]}')
    data = payload.get("inputs", payload.get("instances"))
    if data is None:
        raise Refused(400, 'expected key "inputs" or "instances" holding pixel arrays')
    if _depth(data) > len(shape):  # counted before any conversion: a huge batch costs nothing
        cap(len(data), max_images)
    return check_batch(numbers(data, "inputs"), shape, "inputs")


def pixels_from_image(body: bytes, meta: dict, max_pixels: int) -> np.ndarray:
    """An image file as one model input, resized as the model's training data was (model.json)."""
    h, w, c = meta["input_shape"]
    try:
        return decode(body, h, w, c, max_pixels, interpolation_of(meta)).astype(np.float32)[None]
    except TooLarge as err:
        raise Refused(413, str(err)) from None
    except ValueError:
        raise Refused(400, "body must be a PNG or JPEG image (it could not be decoded)") from None


async def file_from_multipart(headers, body: bytes) -> bytes:
    """The first file part of a multipart/form-data body that was already read (and size-checked)."""
    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def once():
        yield body

    try:
        form = await MultiPartParser(Headers(headers=dict(headers)), once(), max_part_size=len(body)).parse()
    except MultiPartException as err:
        raise Refused(400, f"malformed multipart body: {err}") from None
    upload = next((v for v in form.values() if hasattr(v, "read")), None)
    if upload is None:
        raise Refused(400, "multipart body has no file part")
    return await upload.read()
