"""The aiohttp application: wiring, lifecycle and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from storage import StorageError, Store, open_store
from storage.types import NodeId, NodeInfo

from . import device_socket, ops_api, records_api, sync_api, yjs_socket
from .auth import TokenVerifier, is_valid_id
from .awareness import Rooms
from .compaction import run_periodically
from .config import Config
from .gate import UpdateGate
from .http_errors import json_errors
from .hub import Hub
from .idempotency import Idempotency
from .live import LiveRecords
from .metrics import Metrics
from .ownership import ClientOwners
from .peers import Peers
from .pipeline import Pipeline
from .ratelimit import RateLimiter, TenantSlots
from .services import SERVICES, Services
from .sockets import OpenSockets

log = logging.getLogger(__name__)

MAX_CLIENT_ID = (1 << 53) - 1


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=config.limits.max_body_bytes)
    app.cleanup_ctx.append(_lifecycle(config))
    app.add_routes(sync_api.routes)
    app.add_routes(records_api.routes)
    app.add_routes(ops_api.routes)
    app.add_routes(device_socket.routes)
    app.add_routes(yjs_socket.routes)
    app.on_shutdown.append(_close_sockets)
    return app


async def _close_sockets(app: web.Application) -> None:
    svc = app.get(SERVICES)
    if svc is not None:
        await svc.sockets.close_all()


def _lifecycle(config: Config) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        store = open_store(config.db)
        await store.open()
        try:
            node = await _register(config, store)
            svc = app[SERVICES] = await _services(config, store, node)
            log.info("node %s ready on %s", node.node_id, config.db)
            peers = Peers(svc.pipeline, config.peer_poll_s)
            await peers.start()
            compactor = asyncio.create_task(
                run_periodically(svc.pipeline, config.compaction_interval_s),
                name="fieldsync-compaction",
            )
            try:
                yield
            finally:
                compactor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await compactor
                await peers.stop()
        finally:
            await store.close()

    return lifecycle


async def _register(config: Config, store: Store) -> NodeInfo:
    """This node's identity: configured, else the one kept from the first start.

    A SQLite database remembers its one node itself. Nodes sharing a database keep
    their id in `config.node_file`, so cursors do not gain a node at every restart.
    """
    node_id = config.node_id
    kept = Path(config.node_file) if config.node_file and store.shared else None
    if node_id is None and kept is not None and kept.exists():
        node_id = kept.read_text().strip()
        if not is_valid_id(node_id):
            raise StorageError(f"{kept} does not hold a node id; remove it or pass --node-id")
    node = await store.register_node(
        NodeId(node_id) if node_id else None, secrets.randbelow(MAX_CLIENT_ID) + 1
    )
    if kept is not None and node_id is None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(node.node_id + "\n")
    return node


async def _services(config: Config, store: Store, node: NodeInfo) -> Services:
    live = LiveRecords(store, node.client_id, max(config.cache_size, 2 * config.limits.max_items))
    owners = ClientOwners(store)
    await owners.load_server_ids()
    pipeline = Pipeline(
        store,
        live,
        owners,
        UpdateGate(config.limits),
        node,
        config.compaction_min_tail,
        config.rates.record,
        config.rules,
    )
    hub = Hub()
    pipeline.listeners.append(hub.publish)
    verifier = TokenVerifier(
        config.jwt_public_key or config.jwt_secret, config.jwt_algorithms, config.jwt_leeway_s
    )
    return Services(
        config=config,
        store=store,
        node=node,
        verifier=verifier,
        live=live,
        pipeline=pipeline,
        idempotency=Idempotency(store, config.idempotency_ttl_s),
        metrics=Metrics(),
        hub=hub,
        sockets=OpenSockets(),
        yjs_rooms=Rooms(),
        limiter=RateLimiter(config.rates),
        tenant_slots=TenantSlots(config.rates.tenant_in_flight, config.rates.tenant_queue),
    )
