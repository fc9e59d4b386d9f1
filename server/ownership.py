"""Yjs client-id ownership: the first device that writes under a client id owns it.

Two writers under one client id silently lose data in Yjs (their structs collide), so
a device may only add new structs under client ids it owns; relaying structs the
server already has is fine. Nodes' own client ids belong to no device.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from storage import Store

_SERVER = "\x00server"


class ClientOwners:
    def __init__(self, store: Store, capacity: int = 200_000) -> None:
        self._store = store
        self._capacity = capacity
        self._owners: OrderedDict[tuple[str, int], str | None] = OrderedDict()
        self._server_ids: frozenset[int] = frozenset()

    async def load_server_ids(self) -> None:
        self._server_ids = await self._store.server_client_ids()

    async def preload(self, tenant: str, clients: Iterable[int]) -> None:
        """Look up owners not yet known (in one store read), so `owner()` answers without
        I/O during a merge."""
        unknown = []
        for client in clients:
            key = (tenant, client)
            if key in self._owners:
                self._owners.move_to_end(key)
            elif client not in self._server_ids:
                unknown.append(client)
        if not unknown:
            return
        owners = await self._store.client_owners(tenant, unknown)
        for client in unknown:
            key = (tenant, client)
            if key not in self._owners:  # a claim made while we waited wins
                self._remember(key, owners.get(client))

    def owner(self, tenant: str, client: int) -> str | None:
        """The owning device; a node's client id is owned by the server."""
        if client in self._server_ids:
            return _SERVER
        return self._owners.get((tenant, client))

    def claim(self, tenant: str, client: int, device: str) -> None:
        self._remember((tenant, client), device)

    def forget(self, claims: Iterable[tuple[str, int]]) -> None:
        """Drop claims whose commit failed."""
        for key in claims:
            self._owners.pop(key, None)

    def _remember(self, key: tuple[str, int], device: str | None) -> None:
        self._owners[key] = device
        self._owners.move_to_end(key)
        while len(self._owners) > self._capacity:
            self._owners.popitem(last=False)
