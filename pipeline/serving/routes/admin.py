"""Operations: Prometheus `GET /metrics`, the token-protected `POST /admin/reload` promotion calls, and
`GET /admin/canary/window?since=<unix time>`, the answers of both variants a rollout's analysis reads."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from pipeline.serving.batching import NoModel
from pipeline.serving.context import authorized, context_of
from pipeline.serving.follow import reload_all
from pipeline.serving.protocols import Refused

router = APIRouter()


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(context_of(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/reload")
def reload(request: Request) -> dict:
    ctx = context_of(request)
    if not authorized(request.headers.get("authorization", ""), ctx.token):
        raise Refused(401, "reload needs the admin token (Authorization: Bearer <token>)")
    try:
        served = reload_all(ctx)
    except NoModel as err:
        raise Refused(409, str(err)) from None
    canary = ctx.canary_now()
    return {"version": served.version, "canary": canary.version if canary else None}


@router.get("/admin/canary/window")
def canary_window(request: Request, since: float = 0.0) -> dict:
    """Every answer kept since `since`, by variant, with its labels: figures a dashboard may show too (no
    inputs, no token, like /metrics)."""
    ctx = context_of(request)
    canary = ctx.canary_now()
    return {
        "canary": canary.version if canary else None,
        "weight": ctx.canary_weight if canary else 0.0,
        "rows": ctx.recent.since(since),
    }
