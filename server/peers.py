"""Other nodes' commits: read them from the shared log, refresh cached docs, fan them out.

A node hears of another node's commit through the store's notices (PostgreSQL
LISTEN/NOTIFY carrying `node seq`), reads that node's entries past the last one it
has taken, brings its cached docs forward, and hands the entries to the same
subscribers as its own commits. Notices are lost while the database is unreachable,
so the follower also polls, and looks for nodes it has not heard of yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from storage import StorageUnavailable
from storage.types import NodeId, Seq

from .pipeline import Pipeline

log = logging.getLogger(__name__)


class Peers:
    def __init__(
        self, pipeline: Pipeline, poll_s: float = 2.0, discover_every: int = 15, page: int = 1000
    ) -> None:
        self._pipeline = pipeline
        self._node = pipeline.node.node_id
        self._poll_s = poll_s
        self._discover_every = discover_every
        self._page = page
        self.taken: dict[NodeId, int] = {}  # per other node: the last seq delivered here
        self._heard: set[NodeId] = set()  # nodes whose notices came before we knew them
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start from the log's current end: what was committed before is read from the log."""
        store = self._pipeline.store
        heads = await store.log_heads()
        self.taken = {n: s for n, s in heads.items() if n != self._node}
        # On a shared database another node may start and write at any moment, before
        # we hear of it: check cached copies from the start.
        self._pipeline.live.other_writers = store.shared or bool(self.taken)
        await store.watch(self._notice)
        self._task = asyncio.create_task(self._run(), name="fieldsync-peers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _notice(self, node: NodeId, seq: Seq) -> None:
        if node != self._node and seq > self.taken.get(node, 0):
            if node not in self.taken:
                self._heard.add(node)
            self._wake.set()

    async def _run(self) -> None:
        rounds = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
            self._wake.clear()
            try:
                heard, self._heard = list(self._heard), set()
                await self._meet(heard)
                if rounds % self._discover_every == 0:
                    await self._discover()
                await self.catch_up()
            except StorageUnavailable as exc:
                log.warning("cannot read other nodes' commits: %s", exc)
            except Exception:  # noqa: BLE001 - the follower must outlive any one bad round
                log.exception("following other nodes failed")
            rounds += 1

    async def _discover(self) -> None:
        heads = await self._pipeline.store.log_heads()
        await self._meet([n for n in heads if n != self._node])

    async def _meet(self, nodes: list[NodeId]) -> None:
        """Start following nodes not followed yet, from the start of their logs."""
        new = [n for n in nodes if n not in self.taken]
        if not new:
            return
        log.info("following nodes %s", ", ".join(new))
        for node in new:
            self.taken[node] = 0
        self._pipeline.live.other_writers = True
        await self._pipeline.owners.load_server_ids()

    async def catch_up(self) -> int:
        """Deliver every entry other nodes committed past what was taken; returns how many."""
        delivered = 0
        for node in list(self.taken):
            while True:
                entries = await self._pipeline.store.read_node_log(
                    node, self.taken[node], self._page
                )
                if not entries:
                    break
                self.taken[node] = entries[-1].position.seq
                self._pipeline.take_remote(entries)
                delivered += len(entries)
                if len(entries) < self._page:
                    break
        return delivered
