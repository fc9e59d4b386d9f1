"""Plain values exchanged with a Store. Bytes and JSON text only: no CRDT, no domain."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, NewType

NodeId = NewType("NodeId", str)
Seq = NewType("Seq", int)


class RecordKey(NamedTuple):
    tenant: str
    domain: str
    record_id: str


class Position(NamedTuple):
    """Where an entry sits in the change log: one node's sequence."""

    node_id: NodeId
    seq: Seq


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: NodeId
    client_id: int


class NewEntry(NamedTuple):
    """An update to append to the change log."""

    key: RecordKey
    bu: str
    update: bytes
    version: int
    origin: str
    actor: str
    device: str | None = None
    decisions: str = "[]"


class LogEntry(NamedTuple):
    position: Position
    key: RecordKey
    bu: str
    update: bytes
    version: int
    origin: str
    actor: str
    device: str | None
    decisions: str
    received_at: float


class RecordWrite(NamedTuple):
    """The record row as it stands after a batch (upserted; the snapshot is untouched)."""

    key: RecordKey
    bu: str
    state_vector: bytes
    materialized: str
    version: int


@dataclass(frozen=True, slots=True)
class RecordRow:
    key: RecordKey
    bu: str
    snapshot: bytes | None
    state_vector: bytes
    materialized: str
    version: int
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record row plus its log entries not yet folded into the snapshot, in log order."""

    row: RecordRow
    tail: tuple[LogEntry, ...]


@dataclass(frozen=True, slots=True)
class IdempotencyWrite:
    tenant: str
    user: str
    key: str
    request_hash: str
    response: bytes
    expires_at: float


@dataclass(frozen=True, slots=True)
class IdempotencyRow:
    request_hash: str
    response: bytes
    expires_at: float


@dataclass(frozen=True, slots=True)
class ClientClaim:
    """The first device to write under a Yjs client id owns it within the tenant."""

    tenant: str
    client_id: int
    device: str


@dataclass(frozen=True, slots=True)
class Fold:
    """Compaction: `snapshot` holds the record's old snapshot plus the entries at `through`."""

    key: RecordKey
    snapshot: bytes
    through: tuple[Position, ...]


@dataclass(frozen=True, slots=True)
class QuarantineItem:
    key: RecordKey
    actor: str
    device: str | None
    reason: str
    update: bytes


@dataclass(slots=True)
class WriteBatch:
    """Everything one request makes durable: it commits whole or not at all."""

    entries: list[NewEntry] = field(default_factory=list)
    records: list[RecordWrite] = field(default_factory=list)
    claims: list[ClientClaim] = field(default_factory=list)
    idempotency: IdempotencyWrite | None = None
    folds: list[Fold] = field(default_factory=list)
    quarantine: list[QuarantineItem] = field(default_factory=list)
    expire_before: float | None = None
    # Called at once when the batch fails, before its caller is told: what the caller
    # built on top of it in memory must be discarded before anyone else can use it.
    on_failure: Callable[[], None] | None = None

    def is_empty(self) -> bool:
        return not (
            self.entries
            or self.records
            or self.claims
            or self.idempotency
            or self.folds
            or self.quarantine
            or self.expire_before is not None
        )
