"""The serving target: an HTTP inference server on `models:/<name>@champion`.

Routes (pipeline/serving/routes): MLflow scoring (`POST /invocations`, a drop-in for `mlflow models serve`),
the Open Inference Protocol v2 (KServe, Triton, MLServer: health, metadata, infer), `POST /predict` for image
files, Prometheus `GET /metrics`, a token-protected `POST /admin/reload` that promotion calls, and a
token-protected `POST /feedback` that turns a sampled request and its true label into a training image.
Every prediction answers with a request id (`X-Request-ID`, the client's own when it sends a usable one).
`create_app` assembles them over one `ServerContext`; `serve` runs the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pipeline.core.config import Params
from pipeline.registry.store import CANARY, CHALLENGER, CHAMPION, Reads
from pipeline.serving import MODEL_URI_FROM_STDIN
from pipeline.serving.batching import Batcher, ModelSlot, NoModel
from pipeline.serving.context import ServerContext
from pipeline.serving.follow import follow, sync_canary
from pipeline.serving.prometheus import Measure, Metrics
from pipeline.serving.protocols import Refused, error_body
from pipeline.serving.routes import admin, feedback, images, oip, scoring
from pipeline.serving.routes.scoring import ScoringRoute


def _context(
    params: Params, slot: ModelSlot, token: str, root: Path | None, feedback_token: str | None
) -> ServerContext:
    cfg = params.serve
    metrics = Metrics()
    if slot.current is not None:
        metrics.served(params.registry.model_name, slot.current.version)
    followed = {"alias": f"@{CHAMPION}", "interval_s": cfg.follow_interval_s, "checked_at": time.time()}
    metrics.alias_checked.set(followed["checked_at"])
    return ServerContext(
        params=params,
        slot=slot,
        token=token,
        feedback_token=feedback_token or feedback_token_from_env(),
        metrics=metrics,
        root=root,
        follows=slot.model_uri is None and cfg.follow_interval_s > 0,
        followed=followed,
        canary=slot.like(CANARY) if slot.model_uri is None else None,
    )


def _start_workers(ctx: ServerContext) -> None:
    """Live sampling into `monitor.folder` (a champion-following server in its checkout only), and with
    `serve.shadow` the @challenger in shadow on the sampled requests."""
    params = ctx.params
    if ctx.root is None or params.monitor.sample_fraction <= 0:
        return
    from pipeline.data.shards import open_folder
    from pipeline.serving.sampling import Sampler

    folder = open_folder(params.monitor.folder, ctx.root)
    ctx.feedback_folder = open_folder(params.data.feedback, ctx.root)
    ctx.workers["sampler"] = Sampler(params.monitor, folder, ctx.metrics)
    if params.serve.shadow:
        from pipeline.serving.shadow import Shadow

        challenger = ctx.slot.like(CHALLENGER)
        ctx.workers["shadow"] = Shadow(
            challenger, params.serve.shadow_queue, folder, params.monitor.flush_s, ctx.metrics
        )


def _error_handlers(app: FastAPI) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(Refused)
    async def refused(request: Request, err: Refused) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, err.status, err.detail), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        body = error_body(request.url.path, err.status_code, str(err.detail))
        return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return JSONResponse(error_body(request.url.path, 422, where), status_code=422)


def feedback_token_from_env() -> str:
    """TOLLGATE_FEEDBACK_TOKEN, else a token of its own: whoever labels inputs does not hold the admin
    token that moves the served model."""
    return os.environ.get("TOLLGATE_FEEDBACK_TOKEN") or secrets.token_urlsafe(24)


def create_app(
    params: Params,
    slot: ModelSlot,
    token: str,
    on_shutdown=None,
    root: Path | None = None,
    feedback_token: str | None = None,
) -> FastAPI:
    """The server's routes around `slot`. With `root` (a champion-following server in its checkout) it also
    samples live traffic into `monitor.folder`, takes feedback into `data.feedback`, and with
    `serve.shadow` runs @challenger in shadow. The API's own reference pages (/docs, /redoc,
    /openapi.json) are served only with `serve.api_docs`: they list the admin routes to anyone who asks."""
    ctx = _context(params, slot, token, root, feedback_token)
    if ctx.canary is not None and slot.current is not None:
        try:  # a rollout in progress: its canary from the first request on, as on every other replica
            sync_canary(ctx)
        except Exception as err:  # noqa: BLE001 - the champion serves alone until the next check
            print(f"[tollgate] cannot load @canary: {type(err).__name__}: {err}", flush=True)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        ctx.batcher = Batcher(params.serve, ctx.metrics)
        tasks = [asyncio.create_task(ctx.batcher.run())]
        if ctx.follows:
            tasks.append(asyncio.create_task(follow(ctx)))
        _start_workers(ctx)
        yield
        for task in tasks:
            task.cancel()
        ctx.batcher.worker.shutdown(wait=False)
        for worker in ctx.workers.values():
            await asyncio.get_running_loop().run_in_executor(None, worker.close)
        if on_shutdown is not None:
            on_shutdown()

    docs = params.serve.api_docs
    app = FastAPI(
        title="tollgate",
        version="1",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.ctx = ctx

    _error_handlers(app)

    for module in (scoring, oip, images, admin, feedback):
        app.include_router(module.router)
    app.add_middleware(ScoringRoute, ctx=ctx)
    app.add_middleware(Measure, metrics=ctx.metrics)  # outermost: counts every route, the scoring one too
    return app


def url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as err:
        raise SystemExit(f"tollgate serve: cannot listen on {host}:{port}: {err.strerror or err}") from None


def _uri_from_stdin() -> str:
    """Registration starts this process before the candidate it validates is logged: the imports a model
    load needs (torch, ~1.5 s) run while it packages, then the URI arrives on a line of its own."""
    import pipeline.training.model  # noqa: F401 - imported now, not after the URI arrives

    uri = sys.stdin.readline().strip()
    if not uri:
        raise SystemExit("tollgate serve: --model-uri - and no URI on standard input")
    return uri


def _load_first(slot: ModelSlot, url: str) -> None:
    try:
        served = slot.reload()
        print(
            f"[tollgate] serving {slot.name} v{served.version} ({slot.model_uri or '@champion'}) at {url}",
            flush=True,
        )
    except NoModel as err:
        print(f"[tollgate] {err}; serving anyway, reload after promotion", flush=True)


def serve(
    params: Params,
    root: Path,
    host: str | None = None,
    port: int | None = None,
    model_uri: str | None = None,
    startup: Callable[[Reads], AbstractContextManager] | None = None,
) -> None:
    """Serve @champion (or one pinned model) until interrupted.

    Only the champion-following server publishes its address and admin token (`.tollgate/server.json`),
    and only once it listens. It loads @champion and publishes inside `startup(reads)`: the CLI passes the
    promotion lock with recovery of a killed promotion, so no promotion can slip between what the server
    loads and when promotion can find it. The registry is read by `pipeline.registry.reader`: mlflow is
    never imported here, so a replica does not carry its tracking stack."""
    import uvicorn

    from pipeline.registry.reader import reader
    from pipeline.serving import state
    from pipeline.serving.transport import timed_protocol

    if model_uri == MODEL_URI_FROM_STDIN:
        model_uri = _uri_from_stdin()
    cfg = params.serve
    reads = reader(params, root)
    slot = ModelSlot(reads, params.registry.model_name, model_uri, runtime=cfg.runtime, threads=cfg.threads)
    token = os.environ.get("TOLLGATE_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    feedback_token = feedback_token_from_env()
    sock = _bind(host or cfg.host, cfg.port if port is None else port)
    url = f"http://{url_host(host or cfg.host)}:{sock.getsockname()[1]}"
    follows, me = model_uri is None, os.getpid()
    with startup(reads) if follows and startup else contextlib.nullcontext():
        _load_first(slot, url)
        if follows:
            state.publish(root, state.this_process(url, token, feedback_token))
    app = create_app(
        params,
        slot,
        token,
        on_shutdown=(lambda: state.withdraw(root, me)) if follows else None,
        root=root if follows else None,
        feedback_token=feedback_token,
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
    """`python -m pipeline.serving.app --model-uri URI`: one pinned model, what registration's infra
    validation starts in a fresh process (a champion-following server starts through `tollgate serve`,
    which takes the promotion lock around it)."""
    import argparse

    from pipeline.core.config import load_params
    from pipeline.serving import add_arguments

    parser = argparse.ArgumentParser(prog="python -m pipeline.serving.app", description=main.__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.model_uri is None:
        parser.error("--model-uri is required (to follow @champion, run `tollgate serve`)")
    root = Path.cwd()
    serve(load_params(root / "params.yaml"), root, args.host, args.port, args.model_uri)


if __name__ == "__main__":
    main()
