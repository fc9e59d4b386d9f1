"""Back-office reads: a record's materialized JSON, and its decision history."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from storage import RecordKey
from storage.types import RecordRow

from .errors import ApiError, ErrorCode
from .services import services
from .sync_api import domain_of

routes = web.RouteTableDef()


@routes.get("/api/v1/records/{domain}/{record_id}")
async def get_record(request: web.Request) -> web.Response:
    svc = services(request)
    principal = svc.authenticate(request)
    key = RecordKey(principal.tenant, domain_of(request), request.match_info["record_id"])
    row = await svc.store.get_record(key)
    if row is None or row.version == 0 or not principal.covers_bu(row.bu):
        raise ApiError(ErrorCode.NOT_FOUND, "no such record")
    return web.json_response(record_json(row))


def record_json(row: RecordRow) -> dict[str, Any]:
    body: dict[str, Any] = {"record_id": row.key.record_id, "bu": row.bu, "version": row.version}
    body.update(json.loads(row.materialized))
    body["created_at"] = iso(row.created_at)
    body["updated_at"] = iso(row.updated_at)
    return body


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
