"""What the handlers share, reached through one typed app key."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from storage import Store
from storage.types import NodeInfo

from .auth import Principal, TokenVerifier, bearer_token
from .awareness import Rooms
from .config import Config
from .errors import ApiError, ErrorCode
from .hub import Hub
from .idempotency import Idempotency
from .live import LiveRecords
from .metrics import Metrics
from .pipeline import Pipeline
from .ratelimit import Limited, RateLimiter, TenantSlots
from .sockets import OpenSockets


@dataclass(slots=True)
class Services:
    config: Config
    store: Store
    node: NodeInfo
    verifier: TokenVerifier
    live: LiveRecords
    pipeline: Pipeline
    idempotency: Idempotency
    metrics: Metrics
    hub: Hub
    sockets: OpenSockets
    yjs_rooms: Rooms
    limiter: RateLimiter
    tenant_slots: TenantSlots

    def limit(self, principal: Principal, device: str | None) -> None:
        """Count one sync request; over a limit it is refused with 429 and Retry-After."""
        try:
            self.limiter.check(principal.tenant, principal.user, device)
        except Limited as exc:
            raise self.refused(exc) from None

    async def limit_request(self, principal: Principal, device: str | None) -> None:
        """`limit` for an HTTP request: the 429 of a client that came back before its
        Retry-After was up is held until then (`EarlyRetries`). A socket's refusals are
        never held: its other frames would wait behind them."""
        try:
            self.limiter.check(principal.tenant, principal.user, device)
        except Limited as exc:
            key = (principal.tenant, principal.user)
            if await self.limiter.early_retries.wait_out(key, exc.retry_after):
                self.metrics.rate_limited_held.inc()
            raise self.refused(exc) from None

    @contextlib.asynccontextmanager
    async def tenant_slot(self, principal: Principal) -> AsyncIterator[None]:
        """Hold one of the tenant's merge slots while the request merges and commits."""
        try:
            async with self.tenant_slots.slot(principal.tenant):
                yield
        except Limited as exc:  # only the slot raises it: the merge itself never does
            raise self.refused(exc) from None

    def refused(self, exc: Limited) -> ApiError:
        """The 429 answer to a limit (counted in `fieldsync_rate_limited_total`)."""
        self.metrics.rate_limited.labels(exc.scope).inc()
        return ApiError(
            ErrorCode.RATE_LIMITED,
            str(exc),
            {"scope": exc.scope, "retry_after": exc.retry_after},
            headers={"Retry-After": str(exc.retry_after)},
        )

    def authenticate(self, request: web.Request) -> Principal:
        return self.verifier.verify(bearer_token(request))


SERVICES = web.AppKey("fieldsync_services", Services)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]
