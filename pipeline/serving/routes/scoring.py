"""MLflow's scoring protocol, a drop-in for `mlflow models serve`: `POST /invocations`, and `/ping`,
`/health`, `/version` answered as MLflow's scoring server answers them (what its load balancers and health
checks call)."""

from __future__ import annotations

from importlib.metadata import version

import orjson
from fastapi import APIRouter, Request, Response

from pipeline.serving import protocols
from pipeline.serving.context import INLINE_BYTES, ServerContext, context_of, off_loop, request_id
from pipeline.serving.protocols import Refused, error_body

router = APIRouter()


@router.get("/ping")
@router.get("/health")
async def ping(request: Request) -> Response:
    """200 once a model is loaded, 404 before: MLflow's scoring server's health check, body and all."""
    loaded = context_of(request).slot.current is not None
    return Response("\n", status_code=200 if loaded else 404, media_type="application/json")


@router.get("/version")
async def mlflow_version() -> Response:
    """The MLflow version whose scoring protocol this server speaks (read from its package metadata)."""
    return Response(version("mlflow"), media_type="application/json")


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


def _pixels(ctx: ServerContext, headers, body: bytes, shape: list[int]):
    cap = ctx.params.serve.max_request_images
    if len(body) > INLINE_BYTES:
        protocols.cap_before_parsing(body, cap)
    return protocols.pixels_from_json(protocols.parse_json(headers, body), shape, cap)


async def score(ctx: ServerContext, headers, body: bytes, rid: str) -> dict:
    """{"inputs" | "instances": pixels} -> {"predictions": probabilities}."""
    served, variant = ctx.served_for(headers, rid)
    x = await off_loop(body, _pixels, ctx, headers, body, served.meta["input_shape"])
    probs = await ctx.predicted(served, x, rid, variant)
    return {"predictions": probs.tolist(), "version": served.version, "request_id": rid}


class ScoringRoute:
    """POST /invocations as a bare ASGI handler. It is the hot path (one small image per request, many
    requests per forward pass), and the web framework's routing, dependency and response machinery cost
    more per request than the model does; everything else goes through FastAPI."""

    path = "/invocations"

    def __init__(self, app, ctx: ServerContext):
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        scope["route"] = self  # lets the Measure middleware label the request by route
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = request_id(headers)
        try:
            body = await protocols.read_body(headers, _asgi_chunks(receive), self.ctx.max_body)
            status, payload = 200, await score(self.ctx, headers, body, rid)
        except Refused as err:
            status, payload = err.status, error_body(self.path, err.status, err.detail)
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
