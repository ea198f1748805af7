"""The Open Inference Protocol v2 (KServe, Triton, MLServer): health, metadata, readiness and infer, for the
model and for its served version (`/v2/models/{m}/versions/{v}/...`). Request and response encoding, the
binary tensor data extension included, is `pipeline.serving.oip`; every error on these routes answers
`{"error": "..."}` (the app's handlers), as the protocol's clients read it."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pipeline.serving import oip
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
    return {"name": "tollgate", "version": "1", "extensions": [oip.EXTENSION]}


async def metadata(request: Request, model_name: str, model_version: str | None = None) -> dict:
    ctx = context_of(request)
    served, _ = ctx.model_named(model_name, model_version)
    canary = ctx.canary_now()
    h, w, c = served.meta["input_shape"]
    return {
        "name": ctx.name,
        "versions": [served.version],
        "platform": "pytorch" if served.onnx is None else "onnxruntime_onnx",
        "inputs": [{"name": oip.INPUT, "datatype": "FP32", "shape": [-1, h, w, c]}],
        "outputs": [{"name": oip.OUTPUT, "datatype": "FP32", "shape": [-1, len(served.meta["classes"])]}],
        "classes": served.meta["classes"],
        "parameters": {
            "runtime": served.runtime,  # torch, or the gated ONNX artefact answering (serve.runtime)
            "follows": ctx.followed if ctx.follows else None,
            "canary": {"version": canary.version, "weight": ctx.canary_weight} if canary else None,
        },
    }


async def model_ready(request: Request, model_name: str, model_version: str | None = None) -> dict:
    ctx = context_of(request)
    ctx.model_named(model_name, model_version)
    return {"name": ctx.name, "ready": True}


def _parse(ctx: ServerContext, headers, body: bytes, shape: list[int]) -> oip.InferRequest:
    return oip.parse_infer(headers, body, shape, ctx.params.serve.max_request_images)


async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
    ctx = context_of(request)
    body = await ctx.body_of(request)
    rid = request_id(request.headers)
    served, variant = ctx.model_named(model_name, model_version, request.headers, rid)
    wanted = await off_loop(body, _parse, ctx, request.headers, body, served.meta["input_shape"])
    probs = await ctx.predicted(served, wanted.x, rid, variant)
    content, headers = oip.infer_response(ctx.name, served.version, probs, rid, wanted)
    return Response(content, headers=headers)


for base in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
    router.add_api_route(base, metadata, methods=["GET"])
    router.add_api_route(base + "/ready", model_ready, methods=["GET"])
    router.add_api_route(base + "/infer", infer, methods=["POST"])
