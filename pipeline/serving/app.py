"""The serving target: an HTTP inference server on `models:/<name>@champion`.

Routes: MLflow scoring (`POST /invocations`, a drop-in for `mlflow models serve`), the Open Inference
Protocol v2 (KServe, Triton, MLServer: health, metadata, infer), `POST /predict` for image files, Prometheus
`GET /metrics`, a token-protected `POST /admin/reload` that promotion calls, and a token-protected
`POST /feedback` that turns a sampled request and its true label into a training image. Every prediction
answers with a request id (`X-Request-ID`, the client's own when it sends a usable one). Parsing lives in
`protocols`, batching and the model slot in `batching`, connection deadlines in `transport`, live
sampling in `sampling`, the shadow challenger in `shadow`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pipeline import live
from pipeline.config import Params
from pipeline.serving import protocols
from pipeline.serving.batching import Batcher, ModelSlot, NoModel, Served
from pipeline.serving.metrics import Measure, Metrics
from pipeline.serving.protocols import Refused
from pipeline.tracking import CHALLENGER, CHAMPION

# Bodies up to this size are parsed on the event loop (well under a millisecond, less than a hand-off to a
# thread costs); larger ones, and every image decode, run on a thread so other requests keep flowing.
INLINE_BYTES = 64 * 1024
FEEDBACK_BYTES = 16 * 1024  # a request id and a label


def request_id(headers) -> str:
    """The client's X-Request-ID when it is safe to keep (it names feedback files), else a new one."""
    given = headers.get("x-request-id")
    return given if given and live.REQUEST_ID.match(given) else uuid.uuid4().hex


async def _off_loop(body: bytes, fn, *args):
    """`fn(*args)`, the parsing of `body`: inline for a small body, on a worker thread for a large one."""
    if len(body) <= INLINE_BYTES:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _asgi_chunks(receive):
    async def chunks():
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refused(400, "client disconnected before sending the whole body")
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return

    return chunks()


async def _request_chunks(request: Request):
    from starlette.requests import ClientDisconnect

    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise Refused(400, "client disconnected before sending the whole body") from None


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
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = request_id(headers)
        try:
            body = await protocols.read_body(headers, _asgi_chunks(receive), self.max_body)
            status, payload = 200, await self.score(headers, body, rid)
        except Refused as err:
            status, payload = err.status, {"detail": err.detail}
        out = orjson.dumps(payload)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(out)).encode()),
                    (b"x-request-id", rid.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": out})


async def follow(slot: ModelSlot, metrics: Metrics, interval: float, status: dict) -> None:
    """Re-read the alias every `interval` seconds and swap to what it names, the way /admin/reload does:
    replicas anywhere converge on a promotion without being told. A version that cannot be loaded is
    counted and retried at the next check; the model already loaded keeps serving."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        before = slot.current.version if slot.current else None
        try:
            served = await loop.run_in_executor(None, slot.reload)
            status["error"] = None
            metrics.served(slot.name, served.version)
            if served.version != before:
                print(f"[tollgate] @champion moved: now serving {slot.name} v{served.version}", flush=True)
        except Exception as err:  # noqa: BLE001 - whatever fails, keep serving and check again
            status["error"] = f"{type(err).__name__}: {err}"
            metrics.follow_errors.inc()
            print(f"[tollgate] cannot follow @champion: {status['error']}", flush=True)
        status["checked_at"] = time.time()
        metrics.alias_checked.set(status["checked_at"])


def _authorized(header: str, token: str) -> bool:
    given = header.removeprefix("Bearer ").strip()
    # Bytes, not str: compare_digest refuses non-ASCII text, and any header byte is possible.
    return secrets.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode())


def create_app(
    params: Params, slot: ModelSlot, token: str, on_shutdown=None, root: Path | None = None
) -> FastAPI:
    """The server's routes around `slot`. With `root` (a champion-following server in its checkout) it also
    samples live traffic into `monitor.folder`, takes feedback into `data.feedback`, and with
    `serve.shadow` runs @challenger in shadow."""
    cfg = params.serve
    name = params.registry.model_name
    max_body = int(cfg.max_body_mb * 1024 * 1024)
    metrics = Metrics()
    if slot.current is not None:
        metrics.served(name, slot.current.version)
    state: dict = {}
    follows = slot.model_uri is None and cfg.follow_interval_s > 0
    followed = {"alias": f"@{CHAMPION}", "interval_s": cfg.follow_interval_s, "checked_at": time.time()}
    metrics.alias_checked.set(followed["checked_at"])

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["batcher"] = batcher = Batcher(cfg, metrics)
        tasks = [asyncio.create_task(batcher.run())]
        if follows:
            tasks.append(asyncio.create_task(follow(slot, metrics, cfg.follow_interval_s, followed)))
        if root is not None and params.monitor.sample_fraction > 0:
            from pipeline.serving.sampling import Sampler

            folder = root / params.monitor.folder
            state["sampler"] = Sampler(params.monitor, folder, metrics)
            if cfg.shadow:
                from pipeline.serving.shadow import Shadow

                challenger = ModelSlot(slot.store, name, alias=CHALLENGER)
                state["shadow"] = Shadow(
                    challenger, cfg.shadow_queue, folder, params.monitor.flush_s, metrics
                )
        yield
        for task in tasks:
            task.cancel()
        batcher.worker.shutdown(wait=False)
        for part in ("sampler", "shadow"):
            if part in state:
                await asyncio.get_running_loop().run_in_executor(None, state[part].close)
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="tollgate", version="1", lifespan=lifespan)

    @app.exception_handler(Refused)
    async def refused(request: Request, err: Refused) -> JSONResponse:
        return JSONResponse({"detail": err.detail}, status_code=err.status)

    def served_now() -> Served:
        served = slot.current
        if served is None:
            raise Refused(503, f"no model loaded: {name} has no @champion yet")
        return served

    def scoring_pixels(headers, body: bytes, shape: list[int]):
        if len(body) > INLINE_BYTES:
            protocols.cap_before_parsing(body, cfg.max_request_images)
        return protocols.pixels_from_json(protocols.parse_json(headers, body), shape, cfg.max_request_images)

    def oip_pixels(headers, body: bytes, shape: list[int]):
        payload = protocols.parse_json(headers, body)
        return payload, protocols.pixels_from_oip(payload, shape, cfg.max_request_images)

    async def predicted(served: Served, x: np.ndarray, rid: str) -> np.ndarray:
        """The batcher's probabilities; a sampled request also hands its input, outputs and embeddings to
        the sampler (and the shadow challenger), neither of which it waits for."""
        sampler = state.get("sampler")
        if sampler is None or not sampler.wanted():
            return await state["batcher"].predict(served, x)
        probs, emb = await state["batcher"].predict(served, x, embeddings=True)
        sampler.offer(rid, served, x, probs, emb)
        if "shadow" in state:
            state["shadow"].offer(rid, served, x, probs)
        return probs

    async def score(headers, body: bytes, rid: str) -> dict:
        """MLflow scoring protocol: {"inputs" | "instances": pixels} -> {"predictions": probabilities}."""
        served = served_now()
        x = await _off_loop(body, scoring_pixels, headers, body, served.meta["input_shape"])
        probs = await predicted(served, x, rid)
        return {"predictions": probs.tolist(), "version": served.version, "request_id": rid}

    app.add_middleware(ScoringRoute, score=score, max_body=max_body)
    app.add_middleware(Measure, metrics=metrics)  # outermost: counts every route, the scoring one too

    async def body_of(request: Request) -> bytes:
        return await protocols.read_body(request.headers, _request_chunks(request), max_body)

    def model_named(model_name: str) -> Served:
        if model_name != name:
            raise Refused(404, f"unknown model {model_name!r}; this server serves {name!r}")
        return served_now()

    @app.get("/v2/health/live")
    async def is_live() -> dict:
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
            "parameters": {"follows": followed if follows else None},
        }

    @app.get("/v2/models/{model_name}/ready")
    async def model_ready(model_name: str) -> dict:
        model_named(model_name)
        return {"name": name, "ready": True}

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: Request) -> Response:
        body = await body_of(request)
        served = model_named(model_name)
        payload, x = await _off_loop(body, oip_pixels, request.headers, body, served.meta["input_shape"])
        rid = request_id(request.headers)
        probs = await predicted(served, x, rid)
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
            "parameters": {"request_id": rid},
        }
        if isinstance(payload, dict) and "id" in payload:
            out["id"] = payload["id"]
        return Response(orjson.dumps(out), media_type="application/json", headers={"x-request-id": rid})

    @app.post("/predict")
    async def predict(request: Request, response: Response, top_k: int = 3) -> dict:
        kind = protocols.media_type(request.headers)
        if kind != "multipart/form-data" and kind not in protocols.IMAGE_TYPES and kind != "":
            raise Refused(
                415,
                f"send a PNG/JPEG body ({', '.join(protocols.IMAGE_TYPES)}) or multipart/form-data, "
                f"got {kind}",
            )
        body = await body_of(request)  # counted on the raw stream, multipart included
        if kind == "multipart/form-data":
            body = await protocols.file_from_multipart(request.headers, body)
        served = served_now()
        x = await asyncio.get_running_loop().run_in_executor(
            None, protocols.pixels_from_image, body, served.meta["input_shape"], cfg.max_image_pixels
        )
        rid = request_id(request.headers)
        probs = (await predicted(served, x, rid))[0]
        k = max(1, min(top_k, len(probs)))
        idx = np.argsort(-probs)[:k]
        classes = served.meta["classes"]
        response.headers["x-request-id"] = rid
        return {
            "version": served.version,
            "request_id": rid,
            "predictions": [{"class": classes[i], "probability": round(float(probs[i]), 6)} for i in idx],
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    feedback_token = os.environ.get("TOLLGATE_FEEDBACK_TOKEN") or token

    async def take_feedback(request: Request) -> dict:
        if not _authorized(request.headers.get("authorization", ""), feedback_token):
            raise Refused(401, "feedback needs a token (Authorization: Bearer <TOLLGATE_FEEDBACK_TOKEN>)")
        if "sampler" not in state:
            raise Refused(
                409, "this server samples no requests (monitor.sample_fraction is 0): nothing to label"
            )
        body = await protocols.read_body(request.headers, _request_chunks(request), FEEDBACK_BYTES)
        payload = protocols.parse_json(request.headers, body)
        if not isinstance(payload, dict) or not isinstance(payload.get("request_id"), str):
            raise Refused(422, 'send {"request_id": "...", "label": "<class>", "item": 0}')
        rid, label, item = payload["request_id"], payload.get("label"), payload.get("item", 0)
        classes = served_now().meta["classes"]
        if label not in classes:
            raise Refused(422, f"label {label!r} is not a class of {name}: {', '.join(classes)}")
        found = state["sampler"].find(rid) if live.REQUEST_ID.match(rid) else None
        if found is None:
            raise Refused(404, f"request {rid[:64]!r} was not sampled here, or is no longer kept")
        version, x = found
        if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < len(x):
            raise Refused(422, f"item must be an image index of the request, 0..{len(x) - 1}")
        folder = root / params.data.feedback
        path = await asyncio.get_running_loop().run_in_executor(
            None, live.save_feedback, folder, label, rid, item, x[item]
        )
        return {"stored": os.path.relpath(path, root), "label": label, "served_version": version}

    @app.post("/feedback", status_code=201)
    async def feedback(request: Request) -> dict:
        try:
            out = await take_feedback(request)
        except Refused as err:
            metrics.feedback.labels(str(err.status)).inc()
            raise
        metrics.feedback.labels("201").inc()
        return out

    @app.post("/admin/reload")
    def reload(request: Request) -> dict:
        if not _authorized(request.headers.get("authorization", ""), token):
            raise Refused(401, "reload needs the admin token (Authorization: Bearer <token>)")
        try:
            served = slot.reload()
        except NoModel as err:
            raise Refused(409, str(err)) from None
        metrics.served(name, served.version)
        return {"version": served.version}

    return app


def url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as err:
        raise SystemExit(f"tollgate serve: cannot listen on {host}:{port}: {err.strerror or err}") from None


def serve(
    params: Params, root: Path, host: str | None = None, port: int | None = None, model_uri: str | None = None
) -> None:
    """Serve @champion (or one pinned model) until interrupted.

    Only the champion-following server publishes its address and admin token (`.tollgate/server.json`),
    and only once it listens. It reads @champion while holding the promotion lock, after finishing any
    promotion a killed process left half-done, so no promotion can slip between what it loads and when
    promotion can find it."""
    import torch
    import uvicorn

    from pipeline import promote, tracking
    from pipeline.serving import state
    from pipeline.serving.transport import timed_protocol

    cfg = params.serve
    host = host or cfg.host
    store = tracking.connect(params, root)
    slot = ModelSlot(store, params.registry.model_name, model_uri)
    token = os.environ.get("TOLLGATE_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    sock = _bind(host, cfg.port if port is None else port)
    url = f"http://{url_host(host)}:{sock.getsockname()[1]}"
    follows = model_uri is None
    me = os.getpid()
    with promote.lock(root, params) if follows else contextlib.nullcontext():
        if follows:
            promote.recover(store, params, root)
        try:
            served = slot.reload()
            print(
                f"[tollgate] serving {slot.name} v{served.version} ({model_uri or '@champion'}) at {url}",
                flush=True,
            )
        except NoModel as err:
            print(f"[tollgate] {err}; serving anyway, reload after promotion", flush=True)
        if follows:
            state.publish(root, state.this_process(url, token))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    app = create_app(
        params,
        slot,
        token,
        on_shutdown=(lambda: state.withdraw(root, me)) if follows else None,
        root=root if follows else None,
    )
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,  # per-request logs cost more than the inference here; /metrics counts requests
        http=timed_protocol(cfg.header_timeout_s, cfg.body_timeout_s),
        limit_concurrency=cfg.max_connections,
    )
    # Everything imported so far (torch, mlflow, ...) lives as long as the process: keep it out of the
    # collector's full passes, which otherwise stall every request for tens of milliseconds.
    gc.freeze()
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:  # SIGTERM/SIGINT withdraw in the app's shutdown: uvicorn re-raises them after it returns
        if follows:
            state.withdraw(root, me)


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.serving.app`: what registration's infra validation starts in a fresh process."""
    import argparse

    from pipeline.config import load_params
    from pipeline.serving import add_arguments

    parser = argparse.ArgumentParser(prog="python -m pipeline.serving.app", description=serve.__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    root = Path.cwd()
    serve(load_params(root / "params.yaml"), root, args.host, args.port, args.model_uri)


if __name__ == "__main__":
    main()
