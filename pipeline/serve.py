"""The serving target: an HTTP inference server on `models:/<name>@champion`.

It loads the weights and metadata of the version behind @champion (no pickle), answers the MLflow
scoring protocol (`/invocations`), Open Inference Protocol health/metadata routes and `/predict` for
image files, and swaps to a new champion on `POST /admin/reload` without dropping requests: the new
model is loaded and warmed beside the old one, then a single reference is replaced.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from pipeline import paths, tracking
from pipeline.config import Params
from pipeline.model import Classifier, load, predict_proba

MAX_BODY_BYTES = 10 * 1024 * 1024  # a single request larger than this is refused before parsing
MAX_IMAGE_PIXELS = 4096 * 4096  # decompression-bomb guard for /predict


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
            with tempfile.TemporaryDirectory() as tmp:
                model, meta = load(tracking.download_model_dir(uri, Path(tmp)))
            h, w, c = meta["input_shape"]
            predict_proba(model, torch.zeros(1, h, w, c))  # warm up before taking traffic
            self.current = Served(version, model, meta)
            return self.current

    def get(self) -> Served:
        served = self.current
        if served is None:
            raise HTTPException(503, f"no model loaded: {self.name} has no @champion yet")
        return served


def _pixels_from_json(payload: object, shape: list[int]) -> np.ndarray:
    if not isinstance(payload, dict):
        raise HTTPException(400, 'expected a JSON object {"inputs": [...]} or {"instances": [...]}')
    data = payload.get("inputs", payload.get("instances"))
    if data is None:
        raise HTTPException(400, 'expected key "inputs" or "instances" holding pixel arrays')
    try:
        x = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError):
        raise HTTPException(400, "inputs must be a rectangular array of numbers") from None
    if list(x.shape[1:]) != list(shape):
        raise HTTPException(
            400, f"inputs must have shape [N, {', '.join(map(str, shape))}] (N >= 1), got {list(x.shape)}"
        )
    if len(x) == 0 or not np.isfinite(x).all():
        raise HTTPException(400, "inputs must be a non-empty batch of finite pixel values")
    return x


def _pixels_from_image(body: bytes, shape: list[int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    h, w, c = shape
    try:
        img = Image.open(io.BytesIO(body))
        img = img.convert("L" if c == 1 else "RGB")
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
    except Image.DecompressionBombError:
        raise HTTPException(400, f"image too large: at most {MAX_IMAGE_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError):
        raise HTTPException(400, "body must be a PNG or JPEG image (it could not be decoded)") from None
    return np.asarray(img, dtype=np.float32).reshape(1, h, w, c)


def create_app(params: Params, slot: ModelSlot, token: str) -> FastAPI:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    app = FastAPI(title="tollgate", version="1")
    name = params.registry.model_name

    async def body_of(request: Request) -> bytes:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"body larger than {MAX_BODY_BYTES} bytes")
        if not body:
            raise HTTPException(400, "empty body")
        return body

    @app.get("/v2/health/live")
    def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready() -> JSONResponse:
        ok = slot.current is not None
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{model_name}")
    def metadata(model_name: str) -> dict:
        if model_name != name:
            raise HTTPException(404, f"unknown model {model_name!r}; this server serves {name!r}")
        served = slot.get()
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

    @app.post("/invocations")
    async def invocations(request: Request) -> dict:
        body = await body_of(request)
        try:
            payload = json.loads(body)
        except ValueError:
            raise HTTPException(400, "body must be JSON") from None
        served = slot.get()
        x = _pixels_from_json(payload, served.meta["input_shape"])
        return {
            "predictions": predict_proba(served.model, torch.from_numpy(x)).tolist(),
            "version": served.version,
        }

    @app.post("/predict")
    async def predict(request: Request, top_k: int = 3) -> dict:
        body = await body_of(request)
        served = slot.get()
        x = _pixels_from_image(body, served.meta["input_shape"])
        probs = predict_proba(served.model, torch.from_numpy(x))[0]
        k = max(1, min(top_k, len(probs)))
        values, idx = probs.topk(k)
        classes = served.meta["classes"]
        return {
            "version": served.version,
            "predictions": [
                {"class": classes[i], "probability": round(float(v), 6)}
                for v, i in zip(values.tolist(), idx.tolist(), strict=True)
            ],
        }

    @app.post("/admin/reload")
    def reload(request: Request) -> dict:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given, token):
            raise HTTPException(401, "reload needs the admin token (Authorization: Bearer <token>)")
        try:
            served = slot.reload()
        except LookupError as err:
            raise HTTPException(409, str(err)) from None
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
    token = os.environ.get("TOLLGATE_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    app = create_app(params, slot, token)
    if model_uri is not None:
        uvicorn.run(app, host=host, port=port, log_level="warning")
        return
    state = root / paths.SERVER_STATE
    state.parent.mkdir(exist_ok=True)
    # The token is a local secret: readable by the owner only, like an SSH key.
    fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": f"http://{_url_host(host)}:{port}", "token": token, "pid": os.getpid()}, f)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        state.unlink(missing_ok=True)


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
