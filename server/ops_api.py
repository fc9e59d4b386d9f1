"""Health, readiness and metrics."""

from __future__ import annotations

from aiohttp import web

from storage import StorageUnavailable
from storage.types import RecordKey

from .services import services

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    svc = services(request)
    return web.json_response({"status": "ok", "node": svc.node.node_id})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    svc = services(request)
    try:
        await svc.store.get_record(RecordKey("", "", ""))
    except StorageUnavailable as exc:
        return web.json_response(
            {"error": {"code": "storage_unavailable", "message": str(exc), "details": {}}},
            status=503,
        )
    return web.json_response({"status": "ready", "node": svc.node.node_id})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    svc = services(request)
    svc.metrics.live_records.set(len(svc.live))
    svc.metrics.open_sockets.set(len(svc.sockets))
    svc.metrics.live_feeds.set(svc.hub.feed_count())
    svc.metrics.merge_retries.set(svc.pipeline.merge_retries)
    svc.metrics.peer_entries.set(svc.pipeline.peer_entries)
    return web.Response(body=svc.metrics.render(), content_type="text/plain")
