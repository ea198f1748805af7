"""The Open Inference Protocol v2 (KServe, Triton, MLServer): health, metadata and infer."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pipeline.serving import protocols
from pipeline.serving.context import ServerContext, context_of, off_loop, request_id

router = APIRouter()


@router.get("/v2/health/live")
async def is_live() -> dict:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request) -> JSONResponse:
    ok = context_of(request).slot.current is not None
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/v2")
async def server_metadata() -> dict:
    return {"name": "tollgate", "version": "1", "extensions": []}


@router.get("/v2/models/{model_name}")
async def metadata(model_name: str, request: Request) -> dict:
    ctx = context_of(request)
    served = ctx.model_named(model_name)
    h, w, c = served.meta["input_shape"]
    return {
        "name": ctx.name,
        "versions": [served.version],
        "platform": "pytorch",
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, h, w, c]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(served.meta["classes"])]}
        ],
        "classes": served.meta["classes"],
        "parameters": {"follows": ctx.followed if ctx.follows else None},
    }


@router.get("/v2/models/{model_name}/ready")
async def model_ready(model_name: str, request: Request) -> dict:
    ctx = context_of(request)
    ctx.model_named(model_name)
    return {"name": ctx.name, "ready": True}


def _pixels(ctx: ServerContext, headers, body: bytes, shape: list[int]):
    payload = protocols.parse_json(headers, body)
    return payload, protocols.pixels_from_oip(payload, shape, ctx.params.serve.max_request_images)


@router.post("/v2/models/{model_name}/infer")
async def infer(model_name: str, request: Request) -> Response:
    ctx = context_of(request)
    body = await ctx.body_of(request)
    served = ctx.model_named(model_name)
    payload, x = await off_loop(body, _pixels, ctx, request.headers, body, served.meta["input_shape"])
    rid = request_id(request.headers)
    probs = await ctx.predicted(served, x, rid)
    out = {
        "model_name": ctx.name,
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
