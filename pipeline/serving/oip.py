"""The Open Inference Protocol v2 (KServe, Triton, MLServer) as its own clients speak it.

An infer request is a JSON object, whatever its Content-Type says (Triton's client sends none). With the
binary tensor data extension (announced in `/v2`'s `extensions` as `binary_tensor_data`), the JSON part is
the first `Inference-Header-Content-Length` bytes of the body and each input with a `binary_data_size`
parameter takes that many bytes after it, little-endian and row-major; the output comes back the same way
when the request asks (`binary_data` on a requested output, or `binary_data_output` in the request's
parameters): its JSON carries `binary_data_size` and the bytes follow the JSON. Plain functions over bytes,
tested without a server; a bad request raises `Refused`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

from pipeline.serving.protocols import Refused, cap, check_batch, numbers

EXTENSION = "binary_tensor_data"
HEADER_LENGTH = "inference-header-content-length"
INPUT = "pixels"
OUTPUT = "probabilities"
DTYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
}
EXPECTED = (
    f'{{"inputs": [{{"name": "{INPUT}", "shape": [N, H, W, C], "datatype": "FP32", "data": [...]}}]}} with '
    f"datatype one of {sorted(DTYPES)} and data matching shape (or binary_data_size and the bytes after the "
    "JSON, its length in Inference-Header-Content-Length)"
)


@dataclass(frozen=True)
class InferRequest:
    x: np.ndarray  # (N, H, W, C) float32 pixels
    binary_output: bool  # the client wants the probabilities as bytes after the JSON
    id: object = None  # the request's own id, echoed back


def _split(headers, body: bytes) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a request body."""
    declared = headers.get(HEADER_LENGTH)
    if declared is None:
        return body, b""
    if not declared.strip().isdigit() or int(declared) > len(body):
        raise Refused(
            400, f"Inference-Header-Content-Length {declared!r} does not fit a {len(body)}-byte body"
        )
    return body[: int(declared)], body[int(declared) :]


def _parse(raw: bytes) -> dict:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Refused(
            400, "the inference request must be a JSON object (strict: no NaN or Infinity)"
        ) from None
    if not isinstance(payload, dict):
        raise Refused(400, f"expected {EXPECTED}")
    return payload


def _tensor(payload: dict) -> tuple[dict, list[int], type]:
    try:
        (tensor,) = payload["inputs"]
        dims = [int(d) for d in tensor["shape"]]
        dtype = DTYPES[tensor["datatype"]]
    except (TypeError, KeyError, ValueError):
        raise Refused(400, f"expected {EXPECTED}") from None
    return tensor, dims, dtype


def _from_bytes(tensor: dict, dims: list[int], dtype: type, binary: bytes) -> np.ndarray:
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > len(binary):
        raise Refused(400, f"binary_data_size {size!r} does not fit the {len(binary)} bytes after the JSON")
    want = int(np.prod(dims)) * np.dtype(dtype).itemsize
    if size != want:
        raise Refused(
            400, f"binary_data_size is {size} bytes; shape {dims} of {tensor['datatype']} needs {want}"
        )
    return np.frombuffer(binary[:size], dtype=np.dtype(dtype).newbyteorder("<")).reshape(dims)


def _from_json(tensor: dict, dims: list[int], dtype: type) -> np.ndarray:
    if "data" not in tensor:
        raise Refused(400, f"expected {EXPECTED}")
    x = numbers(tensor["data"], "input tensor data")
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if x.dtype.kind == "f" or (x.size and (x.min() < info.min or x.max() > info.max)):
            raise Refused(400, f"{tensor['datatype']} data must be integers in {info.min}..{info.max}")
    try:
        with np.errstate(over="ignore"):  # FP16 overflow becomes inf, refused as not finite
            return x.astype(dtype).reshape(dims)
    except ValueError:
        raise Refused(400, f"expected {EXPECTED}") from None


def _wants_binary(payload: dict) -> bool:
    """Whether the client asked for the output as bytes: on the output it requested, else for all outputs."""
    outputs = payload.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or any(
            not isinstance(o, dict) or o.get("name") != OUTPUT for o in outputs
        ):
            raise Refused(400, f'this model has one output, "{OUTPUT}"; requested outputs: {outputs!r}')
        flags = [bool((o.get("parameters") or {}).get("binary_data", False)) for o in outputs]
        if flags:
            return flags[0]
    return bool((payload.get("parameters") or {}).get("binary_data_output", False))


def parse_infer(headers, body: bytes, shape: list[int], max_images: int) -> InferRequest:
    """An infer request's pixels (N, H, W, C) and how to answer it."""
    raw, binary = _split(headers, body)
    payload = _parse(raw)
    tensor, dims, dtype = _tensor(payload)
    if dims:
        cap(dims[0] if len(dims) > len(shape) else 1, max_images)
    binary_input = "binary_data_size" in (tensor.get("parameters") or {})
    x = _from_bytes(tensor, dims, dtype, binary) if binary_input else _from_json(tensor, dims, dtype)
    return InferRequest(check_batch(x, shape, "input tensor"), _wants_binary(payload), payload.get("id"))


def infer_response(name: str, version: str, probs: np.ndarray, rid: str, request: InferRequest):
    """(body, headers) of the answer: JSON, or JSON followed by the probabilities as bytes."""
    output = {"name": OUTPUT, "datatype": "FP32", "shape": list(probs.shape)}
    raw = b""
    if request.binary_output:
        raw = np.ascontiguousarray(probs, dtype="<f4").tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = probs.ravel().tolist()
    out = {
        "model_name": name,
        "model_version": version,
        "outputs": [output],
        "parameters": {"request_id": rid},
    }
    if request.id is not None:
        out["id"] = request.id
    head = orjson.dumps(out)
    headers = {"x-request-id": rid}
    if not raw:
        return head, {**headers, "content-type": "application/json"}
    return head + raw, {**headers, "content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
