"""The Store contract: the one seam between the sync server and a database.

A Store keeps bytes and JSON text; it never decodes an update and knows no domain.
Both backends pass the same contract suite (tests/test_storage_contract.py).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Iterable, Mapping

from .types import (
    IdempotencyRow,
    LogEntry,
    NodeId,
    NodeInfo,
    Position,
    RecordKey,
    RecordRow,
    Seq,
    StoredRecord,
    WriteBatch,
)

CommitNotice = Callable[[NodeId, Seq], None]


class StorageError(Exception):
    """Base class of storage failures."""


class StorageUnavailable(StorageError):
    """The database could not commit or read; nothing of the failed operation is durable."""


class RecordConflict(StorageUnavailable):
    """Another writer moved one of the batch's records (or claimed one of its client ids)
    first; nothing was written.

    Record writes carry the version they produce, and a record's writes in one group
    must continue its stored version without a gap. Whoever merged on an older state
    reloads the record and merges again.
    """


class Store(abc.ABC):
    """Async storage for records, the change log, idempotency keys and client-id claims."""

    shared: bool = False
    """Whether other nodes may write the same database (and `watch` reports their commits)."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, check durability settings, and migrate the schema."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush queued commits and disconnect."""

    @abc.abstractmethod
    async def register_node(self, node_id: NodeId | None, client_id: int) -> NodeInfo:
        """Register this process's node (or reuse the stored one) and return its identity.

        `node_id=None` reuses the node this database already knows as local, or creates one.
        `client_id` is only used when the node is new; a known node keeps its client id.
        """

    @abc.abstractmethod
    async def server_client_ids(self) -> frozenset[int]:
        """The Yjs client ids that belong to nodes (no device may write under them)."""

    @abc.abstractmethod
    async def commit(self, batch: WriteBatch) -> list[Position]:
        """Make the batch durable atomically; returns the log positions of its entries in order.

        Returns only after the commit is durable. Raises StorageUnavailable if it is not;
        then nothing of the batch, nor of any batch queued behind it, was written.
        A record's writes must continue its stored version (the first write of a new
        record is version 1), else RecordConflict; so is a claim of a client id another
        device owns. A fold whose entries were already
        folded is skipped: the snapshot it carries was built from an older one.
        """

    @abc.abstractmethod
    async def load_records(self, keys: Iterable[RecordKey]) -> dict[RecordKey, StoredRecord]:
        """The stored rows and unfolded log tails of the given records; missing ones are absent."""

    @abc.abstractmethod
    async def get_record(self, key: RecordKey) -> RecordRow | None:
        """One record row, without its log."""

    async def record_versions(self, keys: Iterable[RecordKey]) -> dict[RecordKey, int]:
        """The stored version of each record given (records not stored are absent)."""
        rows = [await self.get_record(k) for k in dict.fromkeys(keys)]
        return {r.key: r.version for r in rows if r is not None}

    @abc.abstractmethod
    async def read_log(
        self,
        tenant: str,
        domain: str,
        after: Mapping[NodeId, int],
        limit: int,
        bus: frozenset[str] | None = None,
    ) -> tuple[list[LogEntry], bool]:
        """Up to `limit` entries past `after` (per node), in the tenant/domain and bus given.

        `bus=None` means every bu of the tenant. Each node's entries come in seq order.
        Returns the entries and whether more remain past them.
        """

    @abc.abstractmethod
    async def read_node_log(self, node_id: NodeId, after: int, limit: int) -> list[LogEntry]:
        """Up to `limit` entries of one node's log past seq `after`, every tenant, in seq order."""

    @abc.abstractmethod
    async def log_heads(self) -> dict[NodeId, int]:
        """The last seq of each node that has appended to the log."""

    async def watch(self, notice: CommitNotice) -> None:
        """Call `notice(node, seq)` whenever another node commits entries, up to `seq`.

        Best effort (a notice may be lost while the database is unreachable): readers
        also poll `read_node_log`. Stops at `close()`. Single-node backends do nothing.
        """
        return None

    @abc.abstractmethod
    async def record_log(self, key: RecordKey) -> list[LogEntry]:
        """Every log entry of one record, in log order (for inspection and decision history)."""

    @abc.abstractmethod
    async def record_decisions(self, key: RecordKey, limit: int) -> list[LogEntry]:
        """The record's last `limit` entries that carry decisions, in log order, without
        their update bytes (`update` is empty): the decision history, cheap to read."""

    @abc.abstractmethod
    async def get_idempotency(
        self, tenant: str, user: str, key: str, now: float
    ) -> IdempotencyRow | None:
        """The stored answer for an idempotency key, unless it expired."""

    @abc.abstractmethod
    async def client_owners(self, tenant: str, client_ids: Collection[int]) -> dict[int, str]:
        """The devices that own these Yjs client ids in the tenant (ids nobody owns are left
        out), in one look-up however many there are."""

    @abc.abstractmethod
    async def records_to_compact(self, min_tail: int, limit: int) -> list[RecordKey]:
        """Records with at least `min_tail` unfolded log entries."""

    async def prune(self, now: float) -> None:
        """Drop idempotency keys that expired before `now`."""
        await self.commit(WriteBatch(expire_before=now))
