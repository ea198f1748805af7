"""The serving target: an HTTP inference server on `models:/<name>@champion`.

Protocols: MLflow scoring (`POST /invocations`, a drop-in for `mlflow models serve`), the Open Inference
Protocol v2 (KServe, Triton, MLServer: health, metadata, infer), `POST /predict` for image files, Prometheus
`GET /metrics`, and a token-protected `POST /admin/reload` that promotion calls.

Concurrent requests are batched dynamically: a single worker runs one forward pass over everything queued,
up to `serve.max_batch_size` images, waiting at most `serve.max_latency_ms` for a batch to fill. A reload
loads and warms the new champion beside the old one, then swaps one reference; each request keeps the model
it was validated against, so in-flight requests finish on the old one and none fail.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from pipeline import paths, tracking
from pipeline.config import Params, ServeConfig
from pipeline.model import Classifier, predict_proba

# The last is what `curl --data-binary @digit.png` sends by default; the decoder checks the bytes anyway.
IMAGE_TYPES = ("image/png", "image/jpeg", "application/octet-stream", "application/x-www-form-urlencoded")


@dataclass(frozen=True)
class Served:
    version: str
    model: Classifier
    meta: dict


class ModelSlot:
    """Holds the served model; readers take one reference, reload swaps it atomically.

    By default it follows `<name>@champion`; with `model_uri` it serves that one model (a candidate under
    infra validation) and reload is a no-op."""

    def __init__(self, name: str, model_uri: str | None = None):
        self.name = name
        self.model_uri = model_uri
        self.current: Served | None = None
        self._reload_lock = threading.Lock()

    def _target(self) -> tuple[str, str]:
        if self.model_uri is not None:
            return "candidate", self.model_uri
        ref = tracking.alias_version(self.name, tracking.CHAMPION)
        if ref is None:
            raise LookupError(f"{self.name} has no @champion yet: run the pipeline first (dvc repro)")
        return ref.version, ref.uri

    def reload(self) -> Served:
        with self._reload_lock:
            version, uri = self._target()
            if self.current is not None and self.current.version == version:
                return self.current
            model, meta = tracking.load_model(uri)
            h, w, c = meta["input_shape"]
            predict_proba(model, torch.zeros(1, h, w, c))  # warm up before taking traffic
            self.current = Served(version, model, meta)
            return self.current

    def get(self) -> Served:
        served = self.current
        if served is None:
            raise HTTPException(503, f"no model loaded: {self.name} has no @champion yet")
        return served


class Metrics:
    """Prometheus series of this server, in a registry of its own (several servers may share a process in
    tests)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tollgate_requests", "HTTP requests", ["endpoint", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "tollgate_request_latency_seconds",
            "Request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.batch = Histogram(
            "tollgate_batch_size",
            "Images per forward pass",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.version = Gauge(
            "tollgate_model_version", "Served model version", ["model", "version"], registry=self.registry
        )

    def served(self, name: str, version: str) -> None:
        self.version.clear()
        self.version.labels(name, version).set(1)


class Measure:
    """Counts and times every request by route template and status (a plain ASGI middleware: Starlette's
    BaseHTTPMiddleware costs more per request than a batched forward pass here)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = route.path if route is not None else "unmatched"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


class Batcher:
    """Runs queued requests through the model together, one forward pass at a time, off the event loop."""

    def __init__(self, cfg: ServeConfig, metrics: Metrics):
        self.max_batch = cfg.max_batch_size
        self.max_wait = cfg.max_latency_ms / 1000
        self.metrics = metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="forward")

    async def predict(self, served: Served, x: np.ndarray) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((served, x, fut))
        return await fut

    def _drain(self, items: list, size: int) -> int:
        while size < self.max_batch and not self.queue.empty():
            item = self.queue.get_nowait()
            items.append(item)
            size += len(item[1])
        return size

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            size = self._drain(items, len(items[0][1]))
            if size < self.max_batch and self.max_wait > 0:
                # Requests arriving while the previous batch ran are already queued; give stragglers one
                # short window rather than a wait per request.
                await asyncio.sleep(self.max_wait)
                size = self._drain(items, size)
            self.metrics.batch.observe(size)
            await self._forward(loop, items)

    async def _forward(self, loop, items: list) -> None:
        # A reload may land between two requests: each group runs on the model it was validated against.
        groups: dict[int, list] = {}
        for item in items:
            groups.setdefault(id(item[0]), []).append(item)
        for group in groups.values():
            served = group[0][0]
            x = np.concatenate([i[1] for i in group])
            try:
                probs = await loop.run_in_executor(self.worker, _forward, served.model, x)
            except Exception as err:  # noqa: BLE001 - hand the failure to every waiting request
                for _, _, fut in group:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            start = 0
            for _, xi, fut in group:
                if not fut.done():
                    fut.set_result(probs[start : start + len(xi)])
                start += len(xi)


def _forward(model: Classifier, x: np.ndarray) -> np.ndarray:
    return predict_proba(model, torch.from_numpy(x)).numpy()


def _check_batch(x: np.ndarray, shape: list[int], what: str) -> np.ndarray:
    if x.ndim == len(shape):  # a single image without the batch axis
        x = x[None]
    if list(x.shape[1:]) != list(shape) or len(x) == 0:
        dims = ", ".join(map(str, shape))
        raise HTTPException(
            400, f"{what} must have shape [N, {dims}] or [{dims}] (N >= 1), got {list(x.shape)}"
        )
    if not np.isfinite(x).all():
        raise HTTPException(400, f"{what} must be finite numbers (no NaN or inf)")
    return x


def _pixels_from_json(payload: object, shape: list[int]) -> np.ndarray:
    """MLflow scoring protocol: {"inputs": tensor} or {"instances": [tensor, ...]}."""
    if not isinstance(payload, dict):
        raise HTTPException(400, 'expected a JSON object {"inputs": [...]} or {"instances": [...]}')
    data = payload.get("inputs", payload.get("instances"))
    if data is None:
        raise HTTPException(400, 'expected key "inputs" or "instances" holding pixel arrays')
    try:
        x = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError):
        raise HTTPException(400, "inputs must be a rectangular array of numbers") from None
    return _check_batch(x, shape, "inputs")


OIP_DTYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
}


def _pixels_from_oip(payload: object, shape: list[int]) -> np.ndarray:
    """Open Inference Protocol v2 request: one input tensor with name, shape, datatype and (flat) data."""
    try:
        (tensor,) = payload["inputs"]
        dims = [int(d) for d in tensor["shape"]]
        dtype = OIP_DTYPES[tensor["datatype"]]
        x = np.asarray(tensor["data"], dtype=dtype).reshape(dims).astype(np.float32)
    except (TypeError, KeyError, ValueError):
        raise HTTPException(
            400,
            'expected {"inputs": [{"name": "pixels", "shape": [N, H, W, C], "datatype": "FP32", '
            f'"data": [...]}}] with datatype one of {sorted(OIP_DTYPES)} and data matching shape',
        ) from None
    return _check_batch(x, shape, "input tensor")


def _pixels_from_image(body: bytes, shape: list[int], max_pixels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    h, w, c = shape
    try:
        img = Image.open(io.BytesIO(body))
        if img.width * img.height > max_pixels:  # checked before decoding: a bomb never gets unpacked
            raise HTTPException(
                413, f"image has {img.width}x{img.height} pixels; at most {max_pixels} allowed"
            )
        img = img.convert("L" if c == 1 else "RGB")
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
    except Image.DecompressionBombError:  # PIL's own guard, for sizes it refuses to even describe
        raise HTTPException(413, f"image has too many pixels; at most {max_pixels} allowed") from None
    except (UnidentifiedImageError, OSError):
        raise HTTPException(400, "body must be a PNG or JPEG image (it could not be decoded)") from None
    return np.asarray(img, dtype=np.float32).reshape(1, h, w, c)


async def read_body(headers, chunks, max_body: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `max_body`, before it is read."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise HTTPException(413, f"body of {declared} bytes; at most {max_body} allowed")
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_body:
            raise HTTPException(413, f"body larger than {max_body} bytes")
        parts.append(chunk)
    if size == 0:
        raise HTTPException(400, "empty body")
    return b"".join(parts)


async def read_json(headers, chunks, max_body: int):
    kind = headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/json":
        raise HTTPException(415, f"content type must be application/json, got {kind or 'none'}")
    try:
        return orjson.loads(await read_body(headers, chunks, max_body))
    except orjson.JSONDecodeError:
        raise HTTPException(400, "body must be valid JSON (strict: no NaN or Infinity literals)") from None


class ScoringRoute:
    """POST /invocations as a bare ASGI handler. It is the hot path (one small image per request, many
    requests per forward pass), and the web framework's routing, dependency and response machinery cost
    more per request than the model does; everything else goes through FastAPI."""

    path = "/invocations"

    def __init__(self, app, score, max_body: int):
        self.app = app
        self.score = score
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        scope["route"] = self  # lets the Measure middleware label the request by route
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

        async def chunks():
            while True:
                message = await receive()
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        try:
            status, payload = 200, await self.score(await read_json(headers, chunks(), self.max_body))
        except HTTPException as err:
            status, payload = err.status_code, {"detail": err.detail}
        body = orjson.dumps(payload)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_app(params: Params, slot: ModelSlot, token: str) -> FastAPI:
    from contextlib import asynccontextmanager

    cfg = params.serve
    name = params.registry.model_name
    max_body = int(cfg.max_body_mb * 1024 * 1024)
    metrics = Metrics()
    if slot.current is not None:
        metrics.served(name, slot.current.version)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = batcher = Batcher(cfg, metrics)
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.worker.shutdown(wait=False)

    app = FastAPI(title="tollgate", version="1", lifespan=lifespan)

    async def score(payload) -> dict:
        """MLflow scoring protocol: {"inputs" | "instances": pixels} -> {"predictions": probabilities}."""
        served = slot.get()
        x = _pixels_from_json(payload, served.meta["input_shape"])
        probs = await state["batcher"].predict(served, x)
        return {"predictions": probs.tolist(), "version": served.version}

    app.add_middleware(ScoringRoute, score=score, max_body=max_body)
    app.add_middleware(Measure, metrics=metrics)  # outermost: counts every route, the scoring one too

    async def body_of(request: Request) -> bytes:
        return await read_body(request.headers, request.stream(), max_body)

    async def json_of(request: Request):
        return await read_json(request.headers, request.stream(), max_body)

    def model_named(model_name: str) -> Served:
        if model_name != name:
            raise HTTPException(404, f"unknown model {model_name!r}; this server serves {name!r}")
        return slot.get()

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = slot.current is not None
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "tollgate", "version": "1", "extensions": []}

    @app.get("/v2/models/{model_name}")
    async def metadata(model_name: str) -> dict:
        served = model_named(model_name)
        h, w, c = served.meta["input_shape"]
        return {
            "name": name,
            "versions": [served.version],
            "platform": "pytorch",
            "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, h, w, c]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(served.meta["classes"])]}
            ],
            "classes": served.meta["classes"],
        }

    @app.get("/v2/models/{model_name}/ready")
    async def model_ready(model_name: str) -> dict:
        model_named(model_name)
        return {"name": name, "ready": True}

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: Request) -> Response:
        payload = await json_of(request)
        served = model_named(model_name)
        x = _pixels_from_oip(payload, served.meta["input_shape"])
        probs = await state["batcher"].predict(served, x)
        out = {
            "model_name": name,
            "model_version": served.version,
            "outputs": [
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": list(probs.shape),
                    "data": probs.ravel().tolist(),
                }
            ],
        }
        if isinstance(payload, dict) and "id" in payload:
            out["id"] = payload["id"]
        return Response(orjson.dumps(out), media_type="application/json")

    @app.post("/predict")
    async def predict(request: Request, top_k: int = 3) -> dict:
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        if kind == "multipart/form-data":
            form = await request.form(max_part_size=max_body)
            upload = next((v for v in form.values() if hasattr(v, "read")), None)
            if upload is None:
                raise HTTPException(400, "multipart body has no file part")
            body = await upload.read()
        elif kind in IMAGE_TYPES or kind == "":
            body = await body_of(request)
        else:
            raise HTTPException(
                415, f"send a PNG/JPEG body ({', '.join(IMAGE_TYPES)}) or multipart/form-data, got {kind}"
            )
        served = slot.get()
        x = _pixels_from_image(body, served.meta["input_shape"], cfg.max_image_pixels)
        probs = (await state["batcher"].predict(served, x))[0]
        k = max(1, min(top_k, len(probs)))
        idx = np.argsort(-probs)[:k]
        classes = served.meta["classes"]
        return {
            "version": served.version,
            "predictions": [{"class": classes[i], "probability": round(float(probs[i]), 6)} for i in idx],
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    def reload(request: Request) -> dict:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given, token):
            raise HTTPException(401, "reload needs the admin token (Authorization: Bearer <token>)")
        try:
            served = slot.reload()
        except LookupError as err:
            raise HTTPException(409, str(err)) from None
        metrics.served(name, served.version)
        return {"version": served.version}

    return app


def serve(
    params: Params, root: Path, host: str | None = None, port: int | None = None, model_uri: str | None = None
) -> None:
    """Serve @champion (or one pinned model) until interrupted. Only the champion-following server
    publishes its address and admin token for the promote stage."""
    import uvicorn

    host = host or params.serve.host
    port = params.serve.port if port is None else port
    tracking.connect(params, root)
    slot = ModelSlot(params.registry.model_name, model_uri)
    try:
        served = slot.reload()
        print(f"[tollgate] serving {slot.name} v{served.version} ({model_uri or '@champion'})", flush=True)
    except LookupError as err:
        print(f"[tollgate] {err}; serving anyway, reload after promotion", flush=True)
    if params.serve.threads:
        torch.set_num_threads(params.serve.threads)
    token = os.environ.get("TOLLGATE_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    app = create_app(params, slot, token)
    state = None if model_uri is not None else root / paths.SERVER_STATE
    if state is not None:
        state.parent.mkdir(exist_ok=True)
        # The token is a local secret: readable by the owner only, like an SSH key.
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": f"http://{_url_host(host)}:{port}", "token": token, "pid": os.getpid()}, f)
    # Everything imported so far (torch, mlflow, ...) lives as long as the process: keep it out of the
    # collector's full passes, which otherwise stall every request for tens of milliseconds.
    gc.freeze()
    try:
        # Per-request access logs cost more than the inference here; /metrics counts requests instead.
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        if state is not None:
            state.unlink(missing_ok=True)


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
