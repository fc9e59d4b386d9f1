"""The embedded default Store: one SQLite file in WAL mode with synchronous=FULL.

All writes go through one connection driven by the group committer (BEGIN IMMEDIATE
... COMMIT per group); reads run on a separate connection beside it.
"""

from __future__ import annotations

import functools
import itertools
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from .base import RecordConflict, StorageError, StorageUnavailable, Store
from .group_commit import GroupCommitted, GroupCommitter, GroupPolicy, number_entries
from .sqlite_schema import MIGRATIONS, SCHEMA_VERSION
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
from .versions import stale_records, versioned_writes

QUARANTINE_KEEP = 10_000
_LOG_COLUMNS = (
    "node_id, seq, tenant, domain, record_id, bu, update_bytes, version,"
    " origin, actor, device, decisions, received_at"
)
_RECORD_COLUMNS = (
    "tenant, domain, record_id, bu, snapshot, state_vector, materialized, version,"
    " created_at, updated_at"
)
_JOINED_COLUMNS = ", ".join(
    [f"r.{c.strip()}" for c in _RECORD_COLUMNS.split(",")]
    + [f"l.{c.strip()}" for c in _LOG_COLUMNS.split(",")]
)


class SQLiteStore(GroupCommitted, Store):
    def __init__(self, path: str | Path, policy: GroupPolicy | None = None) -> None:
        self.path = Path(path)
        self._policy = policy or GroupPolicy()
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._committer: GroupCommitter | None = None
        self._node: NodeId | None = None
        self._next_seq = 1

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect()
        await self._check_durability(self._writer)
        await self._migrate(self._writer)
        self._reader = await self._connect()
        await self._reader.execute("PRAGMA query_only = ON")
        self._committer = GroupCommitter(
            self._write_group,
            self._policy,
            functools.partial(stale_records, stored_versions=self.record_versions),
        )
        self._committer.start()

    async def close(self) -> None:
        if self._committer is not None:
            await self._committer.close()
            self._committer = None
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        await conn.execute("PRAGMA busy_timeout = 10000")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = FULL")
        return conn

    @staticmethod
    async def _check_durability(conn: aiosqlite.Connection) -> None:
        mode = await _scalar(conn, "PRAGMA journal_mode")
        sync = await _scalar(conn, "PRAGMA synchronous")
        if str(mode).lower() != "wal" or sync != 2:
            raise StorageError(
                f"SQLite refused durable settings (journal_mode={mode}, synchronous={sync});"
                " fieldsync needs WAL with synchronous=FULL"
            )

    @staticmethod
    async def _migrate(conn: aiosqlite.Connection) -> None:
        current = int(await _scalar(conn, "PRAGMA user_version"))
        if current > SCHEMA_VERSION:
            raise StorageError(
                f"database schema {current} is newer than this fieldsync ({SCHEMA_VERSION})"
            )
        for version in range(current, SCHEMA_VERSION):
            await conn.execute("BEGIN IMMEDIATE")
            for statement in _statements(MIGRATIONS[version]):
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {version + 1}")
            await conn.execute("COMMIT")

    # -- nodes -------------------------------------------------------------

    async def register_node(self, node_id: NodeId | None, client_id: int) -> NodeInfo:
        conn = self._conn(self._writer)
        if node_id is None:
            stored = await _scalar(conn, "SELECT value FROM meta WHERE name = 'local_node'")
            node_id = NodeId(str(stored) if stored is not None else f"n-{uuid.uuid4().hex[:12]}")
        await conn.execute("BEGIN IMMEDIATE")
        try:
            await conn.execute(
                "INSERT OR IGNORE INTO nodes (node_id, client_id, created_at) VALUES (?, ?, ?)",
                (node_id, client_id, time.time()),
            )
            await conn.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES ('local_node', ?)", (node_id,)
            )
            await conn.execute("COMMIT")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        stored_client = await _scalar(
            conn, "SELECT client_id FROM nodes WHERE node_id = ?", (node_id,)
        )
        max_seq = await _scalar(conn, "SELECT MAX(seq) FROM log WHERE node_id = ?", (node_id,))
        self._node = node_id
        self._next_seq = int(max_seq or 0) + 1
        return NodeInfo(node_id, int(stored_client))

    async def server_client_ids(self) -> frozenset[int]:
        rows = await self._read("SELECT client_id FROM nodes")
        return frozenset(int(r[0]) for r in rows)

    # -- writes ------------------------------------------------------------

    async def _write_group(self, batches: Sequence[WriteBatch]) -> list[list[Position]]:
        conn = self._conn(self._writer)
        now = time.time()
        first_seq = self._next_seq
        positions, log_rows = number_entries(batches, self._node, first_seq, now)
        self._next_seq += len(log_rows)
        await conn.execute("BEGIN IMMEDIATE")
        try:
            await self._write_rows(conn, batches, log_rows, now)
            await conn.execute("COMMIT")
        except BaseException:
            self._next_seq = first_seq
            await _rollback(conn)
            raise
        return positions

    async def _write_rows(
        self,
        conn: aiosqlite.Connection,
        batches: Sequence[WriteBatch],
        log_rows: list[tuple[Any, ...]],
        now: float,
    ) -> None:
        if log_rows:
            await conn.executemany(
                f"INSERT INTO log ({_LOG_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", log_rows
            )
        await self._write_records(conn, batches, now)
        await self._write_claims(conn, batches, now)
        idem = [
            (i.tenant, i.user, i.key, i.request_hash, i.response, i.expires_at)
            for b in batches
            if (i := b.idempotency) is not None
        ]
        if idem:
            await conn.executemany(
                "INSERT OR REPLACE INTO idempotency"
                " (tenant, user_id, key, request_hash, response, expires_at)"
                " VALUES (?,?,?,?,?,?)",
                idem,
            )
        for expiry in {b.expire_before for b in batches if b.expire_before is not None}:
            await conn.execute("DELETE FROM idempotency WHERE expires_at <= ?", (expiry,))
        await self._write_folds(conn, batches)
        await self._write_quarantine(conn, batches, now)

    @staticmethod
    async def _write_records(
        conn: aiosqlite.Connection, batches: Sequence[WriteBatch], now: float
    ) -> None:
        writes = versioned_writes(batches)
        new = [
            (*w.key, w.bu, w.state_vector, w.materialized, w.version, now, now)
            for w, base in writes
            if base == 0
        ]
        moved = [
            (w.state_vector, w.materialized, w.version, now, *w.key, base)
            for w, base in writes
            if base > 0
        ]
        written = 0
        if new:
            written += (await conn.executemany(_INSERT_RECORD, new)).rowcount
        if moved:
            written += (await conn.executemany(_UPDATE_RECORD, moved)).rowcount
        if written != len(writes):
            keys = ", ".join(str(tuple(w.key)) for w, _ in writes[:5])
            raise RecordConflict(f"a record moved on since it was merged (one of {keys})")

    @staticmethod
    async def _write_claims(
        conn: aiosqlite.Connection, batches: Sequence[WriteBatch], now: float
    ) -> None:
        claims = sorted({(c.tenant, c.client_id, c.device) for b in batches for c in b.claims})
        if not claims:
            return
        await conn.executemany(
            "INSERT OR IGNORE INTO client_ids (tenant, client_id, device, claimed_at)"
            " VALUES (?,?,?,?)",
            [(*c, now) for c in claims],
        )
        marks = ",".join(["(?,?,?)"] * len(claims))
        held = await _scalar(
            conn,
            "SELECT COUNT(*) FROM client_ids"
            f" WHERE (tenant, client_id, device) IN (VALUES {marks})",
            tuple(x for c in claims for x in c),
        )
        if held != len(claims):
            raise RecordConflict("another device claimed one of these Yjs client ids first")

    @staticmethod
    async def _write_folds(conn: aiosqlite.Connection, batches: Sequence[WriteBatch]) -> None:
        for fold in (f for b in batches for f in b.folds):
            through = [(p.node_id, p.seq) for p in fold.through]
            marks = ",".join(["(?,?)"] * len(through))
            unfolded = await _scalar(
                conn,
                f"SELECT COUNT(*) FROM log WHERE folded = 0 AND (node_id, seq) IN (VALUES {marks})",
                tuple(x for pos in through for x in pos),
            )
            if unfolded != len(through):
                continue  # another compaction folded some of them into a newer snapshot
            await conn.execute(
                "UPDATE records SET snapshot = ? WHERE tenant = ? AND domain = ? AND record_id = ?",
                (fold.snapshot, *fold.key),
            )
            await conn.executemany(
                "UPDATE log SET folded = 1 WHERE node_id = ? AND seq = ?", through
            )

    @staticmethod
    async def _write_quarantine(
        conn: aiosqlite.Connection, batches: Sequence[WriteBatch], now: float
    ) -> None:
        items = [q for b in batches for q in b.quarantine]
        if not items:
            return
        await conn.executemany(
            "INSERT INTO quarantine"
            " (tenant, domain, record_id, actor, device, reason, update_bytes, received_at)"
            " VALUES (?,?,?,?,?,?,?,?)",
            [
                (
                    q.key.tenant,
                    q.key.domain,
                    q.key.record_id,
                    q.actor,
                    q.device,
                    q.reason,
                    q.update,
                    now,
                )
                for q in items
            ],
        )
        await conn.execute(
            "DELETE FROM quarantine WHERE id <= (SELECT MAX(id) FROM quarantine) - ?",
            (QUARANTINE_KEEP,),
        )

    # -- reads -------------------------------------------------------------

    async def load_records(self, keys: Iterable[RecordKey]) -> dict[RecordKey, StoredRecord]:
        by_scope: dict[tuple[str, str], list[str]] = {}
        for k in keys:
            by_scope.setdefault((k.tenant, k.domain), []).append(k.record_id)
        found: dict[RecordKey, StoredRecord] = {}
        for (tenant, domain), ids in by_scope.items():
            for chunk in _chunks(sorted(set(ids)), 500):
                found.update(await self._load_chunk(tenant, domain, chunk))
        return found

    async def _load_chunk(
        self, tenant: str, domain: str, ids: list[str]
    ) -> dict[RecordKey, StoredRecord]:
        # One statement, so the row and its unfolded tail come from one consistent read
        # even while a compaction folds entries into the snapshot.
        marks = ",".join("?" * len(ids))
        rows = await self._read(
            f"SELECT {_JOINED_COLUMNS} FROM records r LEFT JOIN log l"
            " ON l.tenant = r.tenant AND l.domain = r.domain AND l.record_id = r.record_id"
            " AND l.folded = 0"
            f" WHERE r.tenant = ? AND r.domain = ? AND r.record_id IN ({marks})"
            " ORDER BY r.record_id, l.node_id, l.seq",
            (tenant, domain, *ids),
        )
        out: dict[RecordKey, StoredRecord] = {}
        width = len(_RECORD_COLUMNS.split(","))
        for _, grouped in itertools.groupby(rows, key=lambda r: r[2]):
            joined = list(grouped)
            row = _record_row(joined[0][:width])
            tail = tuple(_log_entry(r[width:]) for r in joined if r[width] is not None)
            out[row.key] = StoredRecord(row, tail)
        return out

    async def record_versions(self, keys: Iterable[RecordKey]) -> dict[RecordKey, int]:
        by_scope: dict[tuple[str, str], set[str]] = {}
        for k in keys:
            by_scope.setdefault((k.tenant, k.domain), set()).add(k.record_id)
        versions: dict[RecordKey, int] = {}
        for (tenant, domain), ids in by_scope.items():
            for chunk in _chunks(sorted(ids), 500):
                rows = await self._read(
                    "SELECT record_id, version FROM records WHERE tenant = ? AND domain = ?"
                    f" AND record_id IN ({','.join('?' * len(chunk))})",
                    (tenant, domain, *chunk),
                )
                versions.update({RecordKey(tenant, domain, str(r)): int(v) for r, v in rows})
        return versions

    async def get_record(self, key: RecordKey) -> RecordRow | None:
        rows = await self._read(
            f"SELECT {_RECORD_COLUMNS} FROM records"
            " WHERE tenant = ? AND domain = ? AND record_id = ?",
            tuple(key),
        )
        return _record_row(rows[0]) if rows else None

    async def read_log(
        self,
        tenant: str,
        domain: str,
        after: Mapping[NodeId, int],
        limit: int,
        bus: frozenset[str] | None = None,
    ) -> tuple[list[LogEntry], bool]:
        nodes = sorted(str(r[0]) for r in await self._read("SELECT node_id FROM nodes"))
        bu_sql, bu_args = _bu_filter(bus)
        entries: list[LogEntry] = []
        for node in nodes:
            room = limit - len(entries)
            rows = await self._read(
                f"SELECT {_LOG_COLUMNS} FROM log WHERE tenant = ? AND domain = ?"
                f" AND node_id = ? AND seq > ?{bu_sql} ORDER BY seq LIMIT ?",
                (tenant, domain, node, int(after.get(NodeId(node), 0)), *bu_args, room + 1),
            )
            entries.extend(_log_entry(r) for r in rows[:room])
            if len(rows) > room:
                return entries, True
        return entries, False

    async def read_node_log(self, node_id: NodeId, after: int, limit: int) -> list[LogEntry]:
        rows = await self._read(
            f"SELECT {_LOG_COLUMNS} FROM log WHERE node_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (node_id, after, limit),
        )
        return [_log_entry(r) for r in rows]

    async def log_heads(self) -> dict[NodeId, int]:
        heads: dict[NodeId, int] = {}
        for (node,) in await self._read("SELECT node_id FROM nodes"):
            rows = await self._read("SELECT MAX(seq) FROM log WHERE node_id = ?", (node,))
            if rows and rows[0][0] is not None:
                heads[NodeId(str(node))] = int(rows[0][0])
        return heads

    async def record_log(self, key: RecordKey) -> list[LogEntry]:
        rows = await self._read(
            f"SELECT {_LOG_COLUMNS} FROM log WHERE tenant = ? AND domain = ? AND record_id = ?"
            " ORDER BY received_at, node_id, seq",
            tuple(key),
        )
        return [_log_entry(r) for r in rows]

    async def record_decisions(self, key: RecordKey, limit: int) -> list[LogEntry]:
        columns = _LOG_COLUMNS.replace("update_bytes", "X''")
        rows = await self._read(
            f"SELECT {columns} FROM log WHERE tenant = ? AND domain = ? AND record_id = ?"
            " AND decisions <> '[]' ORDER BY received_at DESC, node_id DESC, seq DESC LIMIT ?",
            (*key, limit),
        )
        return [_log_entry(r) for r in reversed(rows)]

    async def get_idempotency(
        self, tenant: str, user: str, key: str, now: float
    ) -> IdempotencyRow | None:
        rows = await self._read(
            "SELECT request_hash, response, expires_at FROM idempotency"
            " WHERE tenant = ? AND user_id = ? AND key = ? AND expires_at > ?",
            (tenant, user, key, now),
        )
        return (
            IdempotencyRow(str(rows[0][0]), bytes(rows[0][1]), float(rows[0][2])) if rows else None
        )

    async def client_owner(self, tenant: str, client_id: int) -> str | None:
        rows = await self._read(
            "SELECT device FROM client_ids WHERE tenant = ? AND client_id = ?",
            (tenant, client_id),
        )
        return str(rows[0][0]) if rows else None

    async def records_to_compact(self, min_tail: int, limit: int) -> list[RecordKey]:
        rows = await self._read(
            "SELECT tenant, domain, record_id FROM log WHERE folded = 0"
            " GROUP BY tenant, domain, record_id HAVING COUNT(*) >= ? LIMIT ?",
            (min_tail, limit),
        )
        return [RecordKey(str(t), str(d), str(r)) for t, d, r in rows]

    async def quarantined(self, tenant: str) -> list[tuple[str, str, str, bytes]]:
        """(domain, record_id, reason, update) of quarantined updates, oldest first."""
        rows = await self._read(
            "SELECT domain, record_id, reason, update_bytes FROM quarantine"
            " WHERE tenant = ? ORDER BY id",
            (tenant,),
        )
        return [(str(d), str(r), str(w), bytes(u)) for d, r, w, u in rows]

    # -- helpers -----------------------------------------------------------

    async def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        conn = self._conn(self._reader)
        try:
            async with conn.execute(sql, args) as cur:
                return list(await cur.fetchall())
        except aiosqlite.OperationalError as exc:
            raise StorageUnavailable(f"read failed: {exc}") from exc

    @staticmethod
    def _conn(conn: aiosqlite.Connection | None) -> aiosqlite.Connection:
        if conn is None:
            raise StorageUnavailable("the store is not open")
        return conn


_INSERT_RECORD = """
INSERT INTO records (tenant, domain, record_id, bu, state_vector, materialized, version,
                     created_at, updated_at)
VALUES (?,?,?,?,?,?,?,?,?)
ON CONFLICT (tenant, domain, record_id) DO NOTHING
"""
_UPDATE_RECORD = """
UPDATE records SET state_vector = ?, materialized = ?, version = ?, updated_at = ?
WHERE tenant = ? AND domain = ? AND record_id = ? AND version = ?
"""


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _bu_filter(bus: frozenset[str] | None) -> tuple[str, tuple[str, ...]]:
    if bus is None:
        return "", ()
    ordered = tuple(sorted(bus))
    return f" AND bu IN ({','.join('?' * len(ordered))})", ordered


async def _scalar(conn: aiosqlite.Connection, sql: str, args: tuple[Any, ...] = ()) -> Any:
    async with conn.execute(sql, args) as cur:
        row = await cur.fetchone()
    return row[0] if row else None


async def _rollback(conn: aiosqlite.Connection) -> None:
    try:
        await conn.execute("ROLLBACK")
    except aiosqlite.Error:
        pass


def _log_entry(r: Any) -> LogEntry:
    return LogEntry(
        position=Position(NodeId(r[0]), Seq(r[1])),
        key=RecordKey(r[2], r[3], r[4]),
        bu=r[5],
        update=bytes(r[6]),
        version=int(r[7]),
        origin=r[8],
        actor=r[9],
        device=r[10],
        decisions=r[11],
        received_at=float(r[12]),
    )


def _record_row(r: Any) -> RecordRow:
    return RecordRow(
        key=RecordKey(r[0], r[1], r[2]),
        bu=r[3],
        snapshot=bytes(r[4]) if r[4] is not None else None,
        state_vector=bytes(r[5]),
        materialized=r[6],
        version=int(r[7]),
        created_at=float(r[8]),
        updated_at=float(r[9]),
    )
