"""What the handlers share, reached through one typed app key."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from storage import Store
from storage.types import NodeInfo

from .auth import Principal, TokenVerifier, bearer_token
from .awareness import Rooms
from .config import Config
from .hub import Hub
from .idempotency import Idempotency
from .live import LiveRecords
from .metrics import Metrics
from .pipeline import Pipeline
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

    def authenticate(self, request: web.Request) -> Principal:
        return self.verifier.verify(bearer_token(request))


SERVICES = web.AppKey("fieldsync_services", Services)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]
