"""`POST /predict`: an image file (PNG/JPEG, raw body or multipart upload) -> the top-k classes."""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Request, Response

from pipeline.serving import protocols
from pipeline.serving.context import context_of, request_id
from pipeline.serving.protocols import Refused

router = APIRouter()


@router.post("/predict")
async def predict(request: Request, response: Response, top_k: int = 3) -> dict:
    ctx = context_of(request)
    kind = protocols.media_type(request.headers)
    if kind != "multipart/form-data" and kind not in protocols.IMAGE_TYPES and kind != "":
        raise Refused(
            415,
            f"send a PNG/JPEG body ({', '.join(protocols.IMAGE_TYPES)}) or multipart/form-data, got {kind}",
        )
    body = await ctx.body_of(request)  # counted on the raw stream, multipart included
    if kind == "multipart/form-data":
        body = await protocols.file_from_multipart(request.headers, body)
    rid = request_id(request.headers)
    served, variant = ctx.served_for(request.headers, rid)
    x = await asyncio.get_running_loop().run_in_executor(
        None, protocols.pixels_from_image, body, served.meta, ctx.params.serve.max_image_pixels
    )
    probs = (await ctx.predicted(served, x, rid, variant))[0]
    k = max(1, min(top_k, len(probs)))
    idx = np.argsort(-probs)[:k]
    classes = served.meta["classes"]
    response.headers["x-request-id"] = rid
    return {
        "version": served.version,
        "request_id": rid,
        "predictions": [{"class": classes[i], "probability": round(float(probs[i]), 6)} for i in idx],
    }
