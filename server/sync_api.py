"""HTTP sync: batch push (which is also pull by state vector) and vector-clock delta pull."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from crdt_models.registry import UnknownDomain, get_model

from . import codec
from .auth import device_id, is_valid_id
from .changes import advance, merge_page
from .cursor import decode_cursor, encode_cursor
from .errors import ApiError, ErrorCode
from .idempotency import request_hash
from .merge_types import Actor, ItemResult, PushItem
from .services import Services, services

routes = web.RouteTableDef()
# The routes whose handlers call `Services.limit_request` first (server/quick_refusals.py).
PUSH_PATH = "/api/v1/sync/{domain}/sync"
PULL_PATH = "/api/v1/sync/{domain}/changes"


def domain_of(request: web.Request) -> str:
    domain = request.match_info["domain"]
    try:
        get_model(domain)
    except UnknownDomain:
        raise ApiError(ErrorCode.NOT_FOUND, f"unknown domain {domain!r}") from None
    return domain


@routes.post(PUSH_PATH)
async def push(request: web.Request) -> web.Response:
    svc = services(request)
    started = time.perf_counter()
    principal = svc.authenticate(request)
    actor = Actor(principal, device_id(request))
    await svc.limit_request(principal, actor.device)
    domain = domain_of(request)
    raw, body, binary = await codec.read_body(
        request, svc.config.limits.max_body_bytes, svc.config.limits.body_idle_timeout_s
    )
    items = parse_items(body, binary, svc.config.limits.max_items)
    key = request.headers.get("Idempotency-Key")
    async with svc.tenant_slot(principal):
        if key is None:
            answer = _answer(await svc.pipeline.push(actor, domain, items))
        else:
            answer = await _push_once(svc, actor, domain, items, key, request_hash(domain, raw))
    _count(svc, domain, answer)
    svc.metrics.push_seconds.labels(domain).observe(time.perf_counter() - started)
    return codec.encode(answer, codec.wants_msgpack(request, default=binary))


async def _push_once(
    svc: Services, actor: Actor, domain: str, items: list[PushItem], key: str, digest: str
) -> dict[str, Any]:
    tenant, user = actor.principal.tenant, actor.principal.user
    async with svc.idempotency.exclusive(tenant, user, key):
        stored = await svc.idempotency.replay(tenant, user, key, digest)
        if stored is not None:
            return dict(stored)
        answer: dict[str, Any] = {}

        def remember(results: list[ItemResult]) -> Any:
            answer.update(_answer(results))
            return svc.idempotency.record(tenant, user, key, digest, answer)

        await svc.pipeline.push(actor, domain, items, remember)
        return answer


def _answer(results: list[ItemResult]) -> dict[str, Any]:
    return {
        "results": [r.to_wire() for r in results],
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }


def _count(svc: Services, domain: str, answer: Mapping[str, Any]) -> None:
    for result in answer["results"]:
        svc.metrics.items.labels(domain, result["status"]).inc()
        if result["error"]:
            svc.metrics.item_errors.labels(result["error"]["code"]).inc()
        for decision in result["decisions"]:
            svc.metrics.decisions.labels(decision["rule"]).inc()


def parse_items(body: Any, binary: bool, max_items: int) -> list[PushItem]:
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise ApiError(ErrorCode.MALFORMED_BODY, 'the body must be {"items": [...]}')
    raw_items = body["items"]
    if len(raw_items) > max_items:
        raise ApiError(
            ErrorCode.TOO_MANY_ITEMS,
            f"{len(raw_items)} items in one push; at most {max_items}",
            {"max_items": max_items},
        )
    return [_parse_item(i, item, binary) for i, item in enumerate(raw_items)]


def _parse_item(index: int, item: Any, binary: bool) -> PushItem:
    def bad(message: str) -> ApiError:
        return ApiError(ErrorCode.MALFORMED_BODY, f"items[{index}]: {message}", {"item": index})

    if not isinstance(item, dict):
        raise bad("each item must be a map")
    record_id, bu = item.get("record_id"), item.get("bu")
    if not is_valid_id(record_id):
        raise bad("record_id must be a 1-128 character id")
    if bu is not None and not is_valid_id(bu):
        raise bad("bu must be a 1-128 character id")
    try:
        update = _optional_bytes(item, "update", binary)
        state_vector = _optional_bytes(item, "state_vector", binary)
    except ApiError as exc:
        raise bad(exc.message) from None
    if update is None and state_vector is None:
        raise bad("send an update, a state_vector, or both")
    return PushItem(str(record_id), bu, update, state_vector)


def _optional_bytes(item: Mapping[str, Any], name: str, binary: bool) -> bytes | None:
    value = item.get(name)
    return None if value is None else codec.to_bytes(value, binary, name)


@routes.get(PULL_PATH)
async def changes(request: web.Request) -> web.Response:
    svc = services(request)
    principal = svc.authenticate(request)
    await svc.limit_request(principal, device_id(request))
    domain = domain_of(request)
    clock = decode_cursor(principal.tenant, domain, request.query.get("cursor"))
    limit = _limit(request, svc.config.limits.default_pull_limit, svc.config.limits.max_pull_limit)
    entries, more = await svc.store.read_log(principal.tenant, domain, clock, limit, principal.bus)
    page = await merge_page(entries)
    svc.metrics.pulled.labels(domain).inc(len(page))
    answer = {
        "changes": page,
        "cursor": encode_cursor(principal.tenant, domain, advance(clock, entries)),
        "has_more": more,
    }
    return codec.encode(answer, codec.wants_msgpack(request))


def _limit(request: web.Request, default: int, maximum: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise ApiError(ErrorCode.BAD_REQUEST, f"limit must be an integer from 1 to {maximum}")
    return int(raw)
