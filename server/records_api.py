"""Back office: read a record as JSON with its decision history, and edit it (PATCH).

A PATCH is applied as a server-authored edit on behalf of the caller (roles `backoffice`
or `supervisor`), checked by the same rules as a device's merge, and fanned out like
any change.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from crdt_models.context import Origin
from storage import RecordKey
from storage.types import RecordRow

from . import codec
from .auth import Principal, is_valid_id
from .errors import ApiError, ErrorCode
from .merge_types import Actor
from .services import Services, services
from .sync_api import domain_of

routes = web.RouteTableDef()
EDIT_ROLES = frozenset({"backoffice", "supervisor"})
DECISION_HISTORY = 100


@routes.get("/api/v1/records/{domain}/{record_id}")
async def get_record(request: web.Request) -> web.Response:
    svc = services(request)
    principal = svc.authenticate(request)
    key = _key(request, principal)
    return web.json_response(await _visible_record(svc, principal, key))


@routes.patch("/api/v1/records/{domain}/{record_id}")
async def patch_record(request: web.Request) -> web.Response:
    svc = services(request)
    principal = svc.authenticate(request)
    if not principal.roles & EDIT_ROLES:
        raise ApiError(
            ErrorCode.FORBIDDEN, "editing records needs the backoffice or supervisor role"
        )
    key = _key(request, principal)
    _, body, _ = await codec.read_body(
        request, svc.config.limits.max_body_bytes, svc.config.limits.body_idle_timeout_s
    )
    values = _patch_fields(body)
    actor = Actor(principal, request.headers.get("Device-Id"), Origin.BACKOFFICE)
    result = await svc.pipeline.edit(actor, key, values)
    answer = await _visible_record(svc, principal, key)
    answer["decisions"] = result.decisions
    return web.json_response(answer)


def _key(request: web.Request, principal: Principal) -> RecordKey:
    record_id = request.match_info["record_id"]
    if not is_valid_id(record_id):
        raise ApiError(ErrorCode.BAD_REQUEST, "record_id must be a 1-128 character id")
    return RecordKey(principal.tenant, domain_of(request), record_id)


def _patch_fields(body: Any) -> dict[str, object]:
    fields = body.get("fields") if isinstance(body, dict) else None
    if not isinstance(fields, dict) or not fields or set(body) != {"fields"}:
        raise ApiError(
            ErrorCode.MALFORMED_BODY, 'the body must be {"fields": {"name": value, ...}}'
        )
    return fields


async def _visible_record(svc: Services, principal: Principal, key: RecordKey) -> dict[str, Any]:
    row = await svc.store.get_record(key)
    if row is None or row.version == 0 or not principal.covers_bu(row.bu):
        raise ApiError(ErrorCode.NOT_FOUND, "no such record")
    body = record_json(row)
    body["decision_history"] = await decision_history(svc, key)
    return body


async def decision_history(svc: Services, key: RecordKey) -> list[dict[str, Any]]:
    """The record's decisions, newest last: which rule repaired what, when, for whom."""
    shown: list[dict[str, Any]] = []
    for entry in await svc.store.record_decisions(key, DECISION_HISTORY):
        for decision in json.loads(entry.decisions):
            shown.append(
                {
                    "version": entry.version,
                    "at": iso(entry.received_at),
                    "by": entry.actor,
                    "device": entry.device,
                    **decision,
                }
            )
    return shown[-DECISION_HISTORY:]


def record_json(row: RecordRow) -> dict[str, Any]:
    body: dict[str, Any] = {"record_id": row.key.record_id, "bu": row.bu, "version": row.version}
    body.update(json.loads(row.materialized))
    body["created_at"] = iso(row.created_at)
    body["updated_at"] = iso(row.updated_at)
    return body


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
