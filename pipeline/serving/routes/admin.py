"""Operations: Prometheus `GET /metrics`, and the token-protected `POST /admin/reload` promotion calls."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from pipeline.serving.batching import NoModel
from pipeline.serving.context import authorized, context_of
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
        served = ctx.slot.reload()
    except NoModel as err:
        raise Refused(409, str(err)) from None
    ctx.metrics.served(ctx.name, served.version)
    return {"version": served.version}
