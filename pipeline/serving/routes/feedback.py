"""`POST /feedback`: a sampled request and its true label become a training image (data.feedback)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from pipeline.data.feedback import folder_mb, save_feedback
from pipeline.data.shards import REQUEST_ID
from pipeline.serving import protocols
from pipeline.serving.context import ServerContext, authorized, context_of
from pipeline.serving.protocols import Refused

FEEDBACK_BYTES = 16 * 1024  # a request id and a label

router = APIRouter()


def _wanted(ctx: ServerContext, payload) -> tuple[str, str, object]:
    """(request id, label, item) of a well-formed feedback body whose label is a class of the model."""
    if not isinstance(payload, dict) or not isinstance(payload.get("request_id"), str):
        raise Refused(422, 'send {"request_id": "...", "label": "<class>", "item": 0}')
    label = payload.get("label")
    classes = ctx.served_now().meta["classes"]
    if label not in classes:
        raise Refused(422, f"label {label!r} is not a class of {ctx.name}: {', '.join(classes)}")
    return payload["request_id"], label, payload.get("item", 0)


async def _take(ctx: ServerContext, request: Request) -> dict:
    if not authorized(request.headers.get("authorization", ""), ctx.feedback_token):
        raise Refused(401, "feedback needs a token (Authorization: Bearer <TOLLGATE_FEEDBACK_TOKEN>)")
    if "sampler" not in ctx.workers:
        raise Refused(409, "this server samples no requests (monitor.sample_fraction is 0): nothing to label")
    body = await ctx.body_of(request, FEEDBACK_BYTES)
    rid, label, item = _wanted(ctx, protocols.parse_json(request.headers, body))
    loop = asyncio.get_running_loop()  # the lookup may read shards (from a bucket): off the event loop
    found = (
        await loop.run_in_executor(None, ctx.workers["sampler"].find, rid) if REQUEST_ID.match(rid) else None
    )
    if found is None:
        raise Refused(404, f"request {rid[:64]!r} was not sampled here, or is no longer kept")
    version, x = found
    if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < len(x):
        raise Refused(422, f"item must be an image index of the request, 0..{len(x) - 1}")
    folder, bound = ctx.feedback_folder, ctx.params.monitor.feedback_max_mb
    held = await loop.run_in_executor(None, folder_mb, folder)
    if held >= bound:
        raise Refused(
            507,
            f"{ctx.params.data.feedback} holds {held:.0f} MB of feedback, monitor.feedback_max_mb is "
            f"{bound:g}: train on it (data.use_feedback) and archive it, or raise the bound",
        )
    name = await loop.run_in_executor(None, save_feedback, folder, label, rid, item, x[item])
    ctx.recent.label(rid, item, label)  # a canary rollout judges both variants on these
    return {"stored": f"{ctx.params.data.feedback}/{name}", "label": label, "served_version": version}


@router.post("/feedback", status_code=201)
async def feedback(request: Request) -> dict:
    ctx = context_of(request)
    try:
        out = await _take(ctx, request)
    except Refused as err:
        ctx.metrics.feedback.labels(str(err.status)).inc()
        raise
    ctx.metrics.feedback.labels("201").inc()
    return out
