"""The embedded default Store: one SQLite file in WAL mode with synchronous=FULL.

All writes go through one connection driven by the group committer (BEGIN IMMEDIATE
... COMMIT per group), on a thread of its own where a whole group is one call
(`sqlite_thread`); reads run on a few aiosqlite connections beside it (each read on the
least busy one), one call per statement. The WAL is checkpointed in the background by a
connection of its own (`sqlite_checkpoint`), not by the commit that fills it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import sqlite3
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from .base import RecordConflict, StorageError, StorageUnavailable, Store
from .chunked import converted
from .group_commit import Durable, GroupCommitted, GroupCommitter, GroupPolicy, number_entries
from .sqlite_checkpoint import BACKSTOP_PAGES, EVERY_S, Checkpointer
from .sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from .sqlite_thread import ConnectionThread
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
T = TypeVar("T")
READERS = 4
"""Reader connections (threads). With one, every read queued behind the others: a tenant
syncing 50 pushes at once put its record loads in front of every other tenant's."""
_PRAGMAS = ("PRAGMA busy_timeout = 10000", "PRAGMA journal_mode = WAL", "PRAGMA synchronous = FULL")
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
    def __init__(
        self,
        path: str | Path,
        policy: GroupPolicy | None = None,
        checkpoint_every_s: float = EVERY_S,
    ) -> None:
        self.path = Path(path)
        self._policy = policy or GroupPolicy()
        self._writer = ConnectionThread("fieldsync-sqlite-writer")
        self.checkpointer = Checkpointer(self._connect, checkpoint_every_s)
        self._readers: list[aiosqlite.Connection] = []
        self._reading: list[int] = []  # reads in flight on each reader
        self._committer: GroupCommitter | None = None
        self._node: NodeId | None = None
        self._next_seq = 1

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._writer.open(self._connect_writer)
        await self._writer.run(_check_durability)
        await self._writer.run(_migrate)
        await self.checkpointer.open()
        for _ in range(READERS):
            reader = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in (*_PRAGMAS, "PRAGMA query_only = ON"):
                await reader.execute(pragma)
            self._readers.append(reader)
        self._reading = [0] * READERS
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
        readers, self._readers = self._readers, []
        for reader in readers:
            await reader.close()
        await self.checkpointer.close()
        await self._writer.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None)
        for pragma in _PRAGMAS:
            conn.execute(pragma)
        return conn

    def _connect_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")
        return conn

    # -- nodes -------------------------------------------------------------

    async def register_node(self, node_id: NodeId | None, client_id: int) -> NodeInfo:
        node, stored_client, max_seq = await self._writer.run(_register_node, node_id, client_id)
        self._node = node
        self._next_seq = max_seq + 1
        return NodeInfo(node, stored_client)

    async def server_client_ids(self) -> frozenset[int]:
        rows = await self._read("SELECT client_id FROM nodes")
        return frozenset(int(r[0]) for r in rows)

    # -- writes ------------------------------------------------------------

    async def _write_group(
        self, batches: Sequence[WriteBatch], durable: Durable
    ) -> list[list[Position]]:
        now = time.time()
        first_seq = self._next_seq
        positions, log_rows = number_entries(batches, self._node, first_seq, now)
        self._next_seq += len(log_rows)
        committed = functools.partial(_call_on_loop, asyncio.get_running_loop(), durable, positions)
        try:
            await self._writer.run(_write_transaction, batches, log_rows, now, committed)
        except BaseException:
            self._next_seq = first_seq
            raise
        self.checkpointer.written()
        return positions

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
            entries += await converted(rows[:room], _log_entry)
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

    async def client_owners(self, tenant: str, client_ids: Collection[int]) -> dict[int, str]:
        owners: dict[int, str] = {}
        for chunk in _chunks(sorted(set(client_ids)), 500):
            rows = await self._read(
                "SELECT client_id, device FROM client_ids WHERE tenant = ?"
                f" AND client_id IN ({','.join('?' * len(chunk))})",
                (tenant, *chunk),
            )
            owners.update((int(c), str(d)) for c, d in rows)
        return owners

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
        """On the reader with the fewest reads in flight: one hop to its thread."""
        if not self._readers:
            raise StorageUnavailable("the store is not open")
        i = min(range(len(self._readers)), key=self._reading.__getitem__)
        self._reading[i] += 1
        try:
            return list(await self._readers[i].execute_fetchall(sql, args))
        except aiosqlite.OperationalError as exc:
            raise StorageUnavailable(f"read failed: {exc}") from exc
        finally:
            self._reading[i] -= 1


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


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _bu_filter(bus: frozenset[str] | None) -> tuple[str, tuple[str, ...]]:
    if bus is None:
        return "", ()
    ordered = tuple(sorted(bus))
    return f" AND bu IN ({','.join('?' * len(ordered))})", ordered


def _scalar(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(sql, args).fetchone()
    return row[0] if row else None


def _count_listed(
    conn: sqlite3.Connection, where: str, columns: str, rows: Sequence[tuple[Any, ...]]
) -> int:
    """How many rows of `where ...` have their `columns` equal to one of `rows`."""
    one = "(" + ",".join("?" * len(rows[0])) + ")"
    marks = ",".join([one] * len(rows))
    return int(
        _scalar(
            conn,
            f"SELECT COUNT(*) FROM {where} ({columns}) IN (VALUES {marks})",
            tuple(x for row in rows for x in row),
        )
    )


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
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


# -- the writer's thread ------------------------------------------------


def _write_transaction(
    conn: sqlite3.Connection,
    batches: Sequence[WriteBatch],
    log_rows: list[tuple[Any, ...]],
    now: float,
    committed: Callable[[], None],
) -> None:
    """One group, on the writer's thread: all of it is committed, or none of it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        _write_rows(conn, batches, log_rows, now)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    committed()


def _call_on_loop(
    loop: asyncio.AbstractEventLoop, fn: Durable, positions: list[list[Position]]
) -> None:
    """`fn(positions)` on `loop`, from the writer's thread; never raises (the group is
    committed whatever happens here, and the committer settles it after the hop back)."""
    try:
        loop.call_soon_threadsafe(fn, positions)
    except RuntimeError:  # the loop is closing
        pass


def _write_rows(
    conn: sqlite3.Connection,
    batches: Sequence[WriteBatch],
    log_rows: list[tuple[Any, ...]],
    now: float,
) -> None:
    if log_rows:
        conn.executemany(
            f"INSERT INTO log ({_LOG_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", log_rows
        )
    _write_records(conn, batches, now)
    _write_claims(conn, batches, now)
    idem = [
        (i.tenant, i.user, i.key, i.request_hash, i.response, i.expires_at)
        for b in batches
        if (i := b.idempotency) is not None
    ]
    if idem:
        conn.executemany(
            "INSERT OR REPLACE INTO idempotency"
            " (tenant, user_id, key, request_hash, response, expires_at)"
            " VALUES (?,?,?,?,?,?)",
            idem,
        )
    for expiry in {b.expire_before for b in batches if b.expire_before is not None}:
        conn.execute("DELETE FROM idempotency WHERE expires_at <= ?", (expiry,))
    _write_folds(conn, batches)
    _write_quarantine(conn, batches, now)


def _write_records(conn: sqlite3.Connection, batches: Sequence[WriteBatch], now: float) -> None:
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
        written += (conn.executemany(_INSERT_RECORD, new)).rowcount
    if moved:
        written += (conn.executemany(_UPDATE_RECORD, moved)).rowcount
    if written != len(writes):
        keys = ", ".join(str(tuple(w.key)) for w, _ in writes[:5])
        raise RecordConflict(f"a record moved on since it was merged (one of {keys})")


def _write_claims(conn: sqlite3.Connection, batches: Sequence[WriteBatch], now: float) -> None:
    claims = sorted({(c.tenant, c.client_id, c.device) for b in batches for c in b.claims})
    if not claims:
        return
    conn.executemany(
        "INSERT OR IGNORE INTO client_ids (tenant, client_id, device, claimed_at) VALUES (?,?,?,?)",
        [(*c, now) for c in claims],
    )
    held = _count_listed(conn, "client_ids WHERE", "tenant, client_id, device", claims)
    if held != len(claims):
        raise RecordConflict("another device claimed one of these Yjs client ids first")


def _write_folds(conn: sqlite3.Connection, batches: Sequence[WriteBatch]) -> None:
    for fold in (f for b in batches for f in b.folds):
        through = [(p.node_id, p.seq) for p in fold.through]
        unfolded = _count_listed(conn, "log WHERE folded = 0 AND", "node_id, seq", through)
        if unfolded != len(through):
            continue  # another compaction folded some of them into a newer snapshot
        conn.execute(
            "UPDATE records SET snapshot = ? WHERE tenant = ? AND domain = ? AND record_id = ?",
            (fold.snapshot, *fold.key),
        )
        conn.executemany("UPDATE log SET folded = 1 WHERE node_id = ? AND seq = ?", through)


def _write_quarantine(conn: sqlite3.Connection, batches: Sequence[WriteBatch], now: float) -> None:
    items = [q for b in batches for q in b.quarantine]
    if not items:
        return
    conn.executemany(
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
    conn.execute(
        "DELETE FROM quarantine WHERE id <= (SELECT MAX(id) FROM quarantine) - ?",
        (QUARANTINE_KEEP,),
    )


def _check_durability(conn: sqlite3.Connection) -> None:
    mode = _scalar(conn, "PRAGMA journal_mode")
    sync = _scalar(conn, "PRAGMA synchronous")
    if str(mode).lower() != "wal" or sync != 2:
        raise StorageError(
            f"SQLite refused durable settings (journal_mode={mode}, synchronous={sync});"
            " fieldsync needs WAL with synchronous=FULL"
        )


def _migrate(conn: sqlite3.Connection) -> None:
    current = int(_scalar(conn, "PRAGMA user_version"))
    if current > SCHEMA_VERSION:
        raise StorageError(
            f"database schema {current} is newer than this fieldsync ({SCHEMA_VERSION})"
        )
    for version in range(current, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        for statement in _statements(MIGRATIONS[version]):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version + 1}")
        conn.execute("COMMIT")


def _register_node(
    conn: sqlite3.Connection, node_id: NodeId | None, client_id: int
) -> tuple[NodeId, int, int]:
    """This database's node (the one it has, else `node_id` or a new one): its id, its
    client id and the last seq it appended."""
    if node_id is None:
        stored = _scalar(conn, "SELECT value FROM meta WHERE name = 'local_node'")
        node_id = NodeId(str(stored) if stored is not None else f"n-{uuid.uuid4().hex[:12]}")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "INSERT OR IGNORE INTO nodes (node_id, client_id, created_at) VALUES (?, ?, ?)",
            (node_id, client_id, time.time()),
        )
        conn.execute(
            "INSERT OR REPLACE INTO meta (name, value) VALUES ('local_node', ?)", (node_id,)
        )
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    stored_client = _scalar(conn, "SELECT client_id FROM nodes WHERE node_id = ?", (node_id,))
    max_seq = _scalar(conn, "SELECT MAX(seq) FROM log WHERE node_id = ?", (node_id,))
    return node_id, int(stored_client), int(max_seq or 0)
