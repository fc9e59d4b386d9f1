"""The shared Store: PostgreSQL (asyncpg), written by several nodes at once.

Three kinds of connections:

- a small pool for reads (single statements, retried on connection failures only:
  a read cannot apply twice);
- one writer connection driven by the group committer: one transaction per group,
  re-connected on the next group after it broke; a commit is never retried;
- one connection that holds this node's advisory lock (so two processes never write
  one node's sequence) and LISTENs for other nodes' commit notices. It re-connects in
  the background when it drops, and re-takes the lock before this node appends again.

Each node numbers its own log entries in memory; after any failed group the counter is
re-read from the log (a COMMIT whose outcome is unknown may have landed), and the log's
primary key (node_id, seq) is the last guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from .base import CommitNotice, RecordConflict, StorageError, StorageUnavailable, Store
from .chunked import converted
from .group_commit import Durable, GroupCommitted, GroupCommitter, GroupPolicy, number_entries
from .postgres_schema import MIGRATION_LOCK, MIGRATIONS, SCHEMA_VERSION, SCHEMA_VERSION_TABLE
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
from .versions import VersionedWrite, stale_records, versioned_writes

log = logging.getLogger(__name__)

CHANNEL = "fieldsync_log"
"""NOTIFY channel; the payload is `<node_id> <last seq>` of a committed group."""
NODE_LOCK_PREFIX = "fieldsync-node:"
QUARANTINE_KEEP = 10_000
DURABLE_SYNCHRONOUS_COMMIT = frozenset({"on", "local", "remote_write", "remote_apply"})
LOAD_CHUNK = 1000

Connection = Any  # asyncpg.Connection (asyncpg ships no type information)
Row = Any  # asyncpg.Record

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # class 08, ConnectionDoesNotExistError among them
    asyncpg.InterfaceError,  # the connection closed under us, or the pool is closing
    asyncpg.exceptions.InternalClientError,  # e.g. a statement sent as the server hung up
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    OSError,
    TimeoutError,
)
"""Failures of the connection, not of the statement: a read may be tried again."""

CONFLICT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)
"""The transaction certainly rolled back because of another writer: merge again."""

_LOG_COLUMNS = (
    "node_id, seq, tenant, domain, record_id, bu, update_bytes, version,"
    " origin, actor, device, decisions, received_at"
)
_LOG_TYPES = (
    "text[], bigint[], text[], text[], text[], text[], bytea[], bigint[],"
    " text[], text[], text[], text[], float8[]"
)
_RECORD_COLUMNS = (
    "tenant, domain, record_id, bu, snapshot, state_vector, materialized, version,"
    " created_at, updated_at"
)
_RECORD_WIDTH = len(_RECORD_COLUMNS.split(","))
_JOINED_COLUMNS = ", ".join(
    [f"r.{c.strip()}" for c in _RECORD_COLUMNS.split(",")]
    + [f"l.{c.strip()}" for c in _LOG_COLUMNS.split(",")]
)


class PostgresStore(GroupCommitted, Store):
    shared = True

    def __init__(
        self,
        dsn: str,
        policy: GroupPolicy | None = None,
        *,
        pool_min: int = 1,
        pool_max: int = 8,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
        read_retries: int = 2,
        read_backoff: float = 0.05,
        reconnect_max_delay: float = 2.0,
    ) -> None:
        self.dsn = dsn
        self._policy = policy or GroupPolicy()
        self._pool_min, self._pool_max = pool_min, max(pool_min, pool_max)
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._read_retries = read_retries
        self._read_backoff = read_backoff
        self._reconnect_max_delay = reconnect_max_delay
        self._pool: Any = None
        self._writer: Connection | None = None
        self._listen: Connection | None = None
        self._listen_guard = asyncio.Lock()  # every use of the listen connection
        self._listening = False  # LISTEN issued on the current listen connection
        self._node_locked = False  # the current listen connection holds the node lock
        self._reconnect: asyncio.Task[None] | None = None
        self._committer: GroupCommitter | None = None
        self._watchers: list[CommitNotice] = []
        self._node: NodeId | None = None
        self._client_id = 0
        self._next_seq: int | None = None  # None: read MAX(seq) before the next append
        self._closing = False

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        self._closing = False
        # The three connections come up side by side; only the writer touches tables.
        outcomes = await asyncio.gather(
            self._open_writer(), self._open_pool(), self._open_listen(), return_exceptions=True
        )
        failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failure is not None:
            self._closing = True
            await self._disconnect()
            if isinstance(failure, (*CONNECTION_ERRORS, asyncpg.PostgresError)):
                raise StorageUnavailable(f"cannot open PostgreSQL: {failure}") from failure
            raise failure
        self._committer = GroupCommitter(
            self._write_group,
            self._policy,
            functools.partial(stale_records, stored_versions=self.record_versions),
        )
        self._committer.start()

    async def _open_writer(self) -> None:
        self._writer = await self._connect("fieldsync-write")
        await self._migrate(self._writer)

    async def _open_pool(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self._pool_min,
            max_size=self._pool_max,
            timeout=self._connect_timeout,
            command_timeout=self._command_timeout,
            server_settings=_settings("fieldsync-read"),
            reset=_no_reset,
        )

    async def _open_listen(self) -> None:
        async with self._listen_guard:
            await self._listen_connection()

    async def close(self) -> None:
        self._closing = True
        if self._committer is not None:
            await self._committer.close()
            self._committer = None
        if self._reconnect is not None:
            self._reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect
            self._reconnect = None
        await self._disconnect()

    async def _disconnect(self) -> None:
        listen, writer, pool = self._listen, self._writer, self._pool
        self._listen = self._writer = self._pool = None
        self._node_locked = self._listening = False
        if listen is not None:  # closing the session releases the node lock
            await _close_connection(listen)
        if writer is not None:
            await _close_connection(writer)
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except Exception:  # noqa: BLE001 - the database is gone: drop the sockets
                pool.terminate()

    async def _connect(self, role: str = "fieldsync") -> Connection:
        conn = await asyncpg.connect(
            self.dsn,
            timeout=self._connect_timeout,
            command_timeout=self._command_timeout,
            server_settings=_settings(role),
        )
        try:
            mode = str(await conn.fetchval("SHOW synchronous_commit")).lower()
            if mode not in DURABLE_SYNCHRONOUS_COMMIT:
                raise StorageError(
                    f"PostgreSQL has synchronous_commit={mode}: an acknowledged commit could be"
                    " lost in a crash; fieldsync needs on, local, remote_write or remote_apply"
                )
        except BaseException:
            conn.terminate()
            raise
        return conn

    @staticmethod
    async def _migrate(conn: Connection) -> None:
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", MIGRATION_LOCK
            )
            await conn.execute(SCHEMA_VERSION_TABLE)
            current = int(
                await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            )
            if current > SCHEMA_VERSION:
                raise StorageError(
                    f"database schema {current} is newer than this fieldsync ({SCHEMA_VERSION})"
                )
            for version in range(current, SCHEMA_VERSION):
                await conn.execute(MIGRATIONS[version])
                await conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                    version + 1,
                    time.time(),
                )

    # -- the listen connection and the node lock ------------------------------

    async def _listen_connection(self) -> Connection:
        """The listen connection, connected, listening if watched, holding the node lock.

        Call with `_listen_guard` held.
        """
        conn = self._listen
        if conn is None or conn.is_closed():
            self._listen = None
            self._node_locked = self._listening = False
            if conn is not None:
                conn.terminate()
            conn = await self._connect("fieldsync-listen")
            conn.add_termination_listener(self._listen_lost)
            self._listen = conn
        if self._watchers and not self._listening:
            await conn.add_listener(CHANNEL, self._notified)
            self._listening = True
        if self._node is not None and not self._node_locked:
            if not await _try_lock(conn, self._node):
                raise StorageError(f"node {self._node} is already running against this database")
            self._node_locked = True
            self._next_seq = None  # whoever held it meanwhile may have appended
        return conn

    def _listen_lost(self, conn: Connection) -> None:
        if self._closing or conn is not self._listen:
            return
        log.warning("lost the PostgreSQL listen connection; re-connecting")
        self._node_locked = self._listening = False
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.get_running_loop().create_task(
                self._reconnect_listen(), name="fieldsync-pg-listen"
            )

    async def _reconnect_listen(self) -> None:
        delay = 0.05
        while not self._closing:
            try:
                async with self._listen_guard:
                    if self._closing:
                        return
                    await self._listen_connection()
            except Exception as exc:  # noqa: BLE001 - keep trying until close()
                log.info("re-connecting the listen connection failed: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._reconnect_max_delay)
                continue
            log.info("listen connection restored")
            await self._announce_heads()
            return

    async def _announce_heads(self) -> None:
        """After a gap in notices, tell watchers where every other node's log stands."""
        if not self._watchers:
            return
        try:
            heads = await self.log_heads()
        except StorageError:
            return
        for node, seq in heads.items():
            if node != self._node:
                self._tell(node, Seq(seq))

    def _notified(self, conn: Connection, pid: int, channel: str, payload: str) -> None:
        node, _, seq = payload.partition(" ")
        if node == self._node or not seq.isdigit():
            return
        self._tell(NodeId(node), Seq(int(seq)))

    def _tell(self, node: NodeId, seq: Seq) -> None:
        for notice in list(self._watchers):
            try:
                notice(node, seq)
            except Exception:  # noqa: BLE001 - one watcher's bug must not stop the others
                log.exception("commit notice handler failed")

    async def watch(self, notice: CommitNotice) -> None:
        self._watchers.append(notice)
        if self._closing or self._pool is None:
            return
        try:
            async with self._listen_guard:
                conn = self._listen
                if conn is not None and not conn.is_closed() and not self._listening:
                    await conn.add_listener(CHANNEL, self._notified)
                    self._listening = True
        except CONNECTION_ERRORS as exc:  # the re-connect LISTENs again
            log.info("LISTEN failed (will retry on re-connect): %s", exc)

    # -- nodes -------------------------------------------------------------

    async def register_node(self, node_id: NodeId | None, client_id: int) -> NodeInfo:
        """Register (or reuse) a node and hold its lock while this store is open.

        A shared database has no "local" node: `None` reuses the node this store already
        registered, else creates a new one with a generated id.
        """
        if self._pool is None:
            raise StorageUnavailable("the store is not open")
        if node_id is None:
            node_id = self._node or NodeId(f"n-{secrets.token_hex(6)}")
        if node_id == self._node:
            return NodeInfo(node_id, self._client_id)
        async with self._listen_guard:
            conn = await self._listen_connection()
            if not await _try_lock(conn, node_id):
                raise StorageError(f"node {node_id} is already running against this database")
            try:
                stored_client, max_seq = await self._ensure_node(node_id, client_id)
            except BaseException:
                await _unlock(conn, node_id)
                raise
            previous = self._node
            self._node, self._client_id = node_id, stored_client
            self._next_seq = max_seq + 1
            self._node_locked = True
            if previous is not None:
                await _unlock(conn, previous)
        return NodeInfo(node_id, stored_client)

    async def _ensure_node(self, node_id: NodeId, client_id: int) -> tuple[int, int]:
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(
                    "INSERT INTO nodes (node_id, client_id, created_at) VALUES ($1, $2, $3)"
                    " ON CONFLICT (node_id) DO NOTHING",
                    node_id,
                    client_id,
                    time.time(),
                )
                stored = await conn.fetchval(
                    "SELECT client_id FROM nodes WHERE node_id = $1", node_id
                )
                max_seq = await conn.fetchval(
                    "SELECT COALESCE(MAX(seq), 0) FROM log WHERE node_id = $1", node_id
                )
        except asyncpg.exceptions.UniqueViolationError as exc:
            raise StorageError(
                f"client id {client_id} already belongs to another node; register again"
            ) from exc
        except CONNECTION_ERRORS as exc:
            raise StorageUnavailable(f"cannot register node {node_id}: {exc}") from exc
        return int(stored), int(max_seq)

    async def server_client_ids(self) -> frozenset[int]:
        rows = await self._fetch("SELECT client_id FROM nodes")
        return frozenset(int(r[0]) for r in rows)

    # -- writes ------------------------------------------------------------

    async def _write_group(
        self, batches: Sequence[WriteBatch], durable: Durable
    ) -> list[list[Position]]:
        """(Commits on the event loop: the committer settles the callers when this returns.)"""
        try:
            return await self._write_group_once(batches)
        except BaseException as exc:
            # A COMMIT that failed may still have landed: count again from the log.
            self._next_seq = None
            if isinstance(exc, CONFLICT_ERRORS):
                raise RecordConflict(f"another node wrote the same records: {exc}") from exc
            raise

    async def _write_group_once(self, batches: Sequence[WriteBatch]) -> list[list[Position]]:
        appends = any(b.entries for b in batches)
        listen = self._listen
        if appends and (not self._node_locked or listen is None or listen.is_closed()):
            async with self._listen_guard:  # the node lock went with a dropped connection
                await self._listen_connection()
        conn, transaction = await self._begin()
        try:
            if appends and self._next_seq is None:
                self._next_seq = 1 + int(
                    await conn.fetchval(
                        "SELECT COALESCE(MAX(seq), 0) FROM log WHERE node_id = $1", self._node
                    )
                )
            now = time.time()
            first = self._next_seq or 0  # not None whenever there is an entry to number
            positions, rows = number_entries(batches, self._node, first, now)
            if rows:
                self._next_seq = first + len(rows)
            await self._write_rows(conn, batches, [list(c) for c in zip(*rows)], now)
            if rows:
                await conn.execute(
                    "SELECT pg_notify($1, $2)", CHANNEL, f"{self._node} {rows[-1][1]}"
                )
            await transaction.commit()
        except BaseException as exc:
            await self._abandon(conn, transaction, exc)
            raise
        return positions

    async def _begin(self) -> tuple[Connection, Any]:
        """A transaction on the writer connection (a fresh one if the old one went stale)."""
        conn = await self._writer_connection()
        transaction = conn.transaction()
        try:
            await transaction.start()
        except CONNECTION_ERRORS:
            # Only BEGIN was sent, so nothing can have landed: one fresh connection may try.
            self._writer = None
            conn.terminate()
            conn = await self._writer_connection()
            transaction = conn.transaction()
            try:
                await transaction.start()
            except BaseException:
                self._writer = None
                conn.terminate()
                raise
        return conn, transaction

    async def _writer_connection(self) -> Connection:
        conn = self._writer
        if conn is None or conn.is_closed():
            self._writer = None
            if conn is not None:
                conn.terminate()
            conn = self._writer = await self._connect("fieldsync-write")
        return conn

    async def _abandon(self, conn: Connection, transaction: Any, exc: BaseException) -> None:
        """Roll back after a failed group; drop the connection if its state is unknown."""
        if not isinstance(exc, (*CONNECTION_ERRORS, asyncio.CancelledError)) and not (
            conn.is_closed()
        ):
            try:
                await asyncio.wait_for(transaction.rollback(), timeout=self._command_timeout)
                return
            except Exception:  # noqa: BLE001 - fall through and drop the connection
                pass
        if self._writer is conn:
            self._writer = None
        conn.terminate()

    async def _write_rows(
        self,
        conn: Connection,
        batches: Sequence[WriteBatch],
        log_columns: list[list[Any]],
        now: float,
    ) -> None:
        writes = versioned_writes(batches)  # a group that skips a version fails before I/O
        if log_columns:
            await conn.execute(_INSERT_LOG, *log_columns)
        await self._write_records(conn, writes, now)
        await self._write_claims(conn, batches, now)
        idem = {
            (i.tenant, i.user, i.key): i for b in batches if (i := b.idempotency) is not None
        }  # the last answer of a key wins, as a second upsert of it would
        if idem:
            rows = list(idem.values())
            await conn.execute(
                "INSERT INTO idempotency (tenant, user_id, key, request_hash, response, expires_at)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
                " $5::bytea[], $6::float8[])"
                " ON CONFLICT (tenant, user_id, key) DO UPDATE SET"
                " request_hash = EXCLUDED.request_hash, response = EXCLUDED.response,"
                " expires_at = EXCLUDED.expires_at",
                [i.tenant for i in rows],
                [i.user for i in rows],
                [i.key for i in rows],
                [i.request_hash for i in rows],
                [i.response for i in rows],
                [i.expires_at for i in rows],
            )
        expiries = [b.expire_before for b in batches if b.expire_before is not None]
        if expiries:
            await conn.execute("DELETE FROM idempotency WHERE expires_at <= $1", max(expiries))
        await self._write_folds(conn, batches)
        await self._write_quarantine(conn, batches, now)

    @staticmethod
    async def _write_records(conn: Connection, writes: list[VersionedWrite], now: float) -> None:
        if not writes:
            return
        moved = [(w, base) for w, base in writes if base > 0]
        new = [w for w, base in writes if base == 0]
        written = 0
        if moved:
            keys = _key_columns([w.key for w, _ in moved])
            # Lock the rows in one order first, so two nodes' groups never deadlock.
            await conn.execute(_LOCK_RECORDS, *keys)
            written += int(
                await conn.fetchval(
                    _UPDATE_RECORDS,
                    *keys,
                    [w.state_vector for w, _ in moved],
                    [w.materialized for w, _ in moved],
                    [w.version for w, _ in moved],
                    [base for _, base in moved],
                    now,
                )
            )
        if new:
            written += int(
                await conn.fetchval(
                    _INSERT_RECORDS,
                    *_key_columns([w.key for w in new]),
                    [w.bu for w in new],
                    [w.state_vector for w in new],
                    [w.materialized for w in new],
                    [w.version for w in new],
                    now,
                )
            )
        if written != len(writes):
            keys_text = ", ".join(str(tuple(w.key)) for w, _ in writes[:5])
            raise RecordConflict(f"a record moved on since it was merged (one of {keys_text})")

    @staticmethod
    async def _write_claims(conn: Connection, batches: Sequence[WriteBatch], now: float) -> None:
        claims = sorted({(c.tenant, c.client_id, c.device) for b in batches for c in b.claims})
        if not claims:
            return
        columns = [list(column) for column in zip(*claims)]
        await conn.execute(
            "INSERT INTO client_ids (tenant, client_id, device, claimed_at)"
            " SELECT t, c, d, $4 FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(t, c, d)"
            " ON CONFLICT DO NOTHING",
            *columns,
            now,
        )
        held = await conn.fetchval(
            "SELECT COUNT(*) FROM client_ids i"
            " JOIN unnest($1::text[], $2::bigint[], $3::text[]) AS u(t, c, d)"
            " ON i.tenant = u.t AND i.client_id = u.c AND i.device = u.d",
            *columns,
        )
        if held != len(claims):
            raise RecordConflict("another device claimed one of these Yjs client ids first")

    @staticmethod
    async def _write_folds(conn: Connection, batches: Sequence[WriteBatch]) -> None:
        for fold in (f for b in batches for f in b.folds):
            # Two nodes folding one record take turns here; the second sees the first's marks.
            await conn.execute(
                "SELECT 1 FROM records WHERE tenant = $1 AND domain = $2 AND record_id = $3"
                " FOR UPDATE",
                *fold.key,
            )
            nodes = [p.node_id for p in fold.through]
            seqs = [p.seq for p in fold.through]
            unfolded = await conn.fetchval(
                "SELECT COUNT(*) FROM log l"
                " JOIN unnest($1::text[], $2::bigint[]) AS u(node_id, seq)"
                " ON l.node_id = u.node_id AND l.seq = u.seq WHERE NOT l.folded",
                nodes,
                seqs,
            )
            if unfolded != len(fold.through):
                continue  # another compaction folded some of them into a newer snapshot
            await conn.execute(
                "UPDATE records SET snapshot = $4 WHERE tenant = $1 AND domain = $2"
                " AND record_id = $3",
                *fold.key,
                fold.snapshot,
            )
            await conn.execute(
                "UPDATE log SET folded = TRUE"
                " FROM unnest($1::text[], $2::bigint[]) AS u(node_id, seq)"
                " WHERE log.node_id = u.node_id AND log.seq = u.seq",
                nodes,
                seqs,
            )

    @staticmethod
    async def _write_quarantine(
        conn: Connection, batches: Sequence[WriteBatch], now: float
    ) -> None:
        items = [q for b in batches for q in b.quarantine]
        if not items:
            return
        await conn.execute(
            "INSERT INTO quarantine"
            " (tenant, domain, record_id, actor, device, reason, update_bytes, received_at)"
            " SELECT *, $8::float8 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
            " $5::text[], $6::text[], $7::bytea[])",
            [q.key.tenant for q in items],
            [q.key.domain for q in items],
            [q.key.record_id for q in items],
            [q.actor for q in items],
            [q.device for q in items],
            [q.reason for q in items],
            [q.update for q in items],
            now,
        )
        await conn.execute(
            "DELETE FROM quarantine WHERE id <= (SELECT MAX(id) FROM quarantine) - $1",
            QUARANTINE_KEEP,
        )

    # -- reads -------------------------------------------------------------

    async def load_records(self, keys: Iterable[RecordKey]) -> dict[RecordKey, StoredRecord]:
        wanted = sorted(set(keys))
        found: dict[RecordKey, StoredRecord] = {}
        for i in range(0, len(wanted), LOAD_CHUNK):
            found.update(await self._load_chunk(wanted[i : i + LOAD_CHUNK]))
        return found

    async def _load_chunk(self, keys: list[RecordKey]) -> dict[RecordKey, StoredRecord]:
        # One statement, so the row and its unfolded tail come from one snapshot even
        # while a compaction (on any node) folds entries into the snapshot.
        rows = await self._fetch(
            f"SELECT {_JOINED_COLUMNS}"
            " FROM unnest($1::text[], $2::text[], $3::text[]) AS k(tenant, domain, record_id)"
            " JOIN records r"
            " ON r.tenant = k.tenant AND r.domain = k.domain AND r.record_id = k.record_id"
            " LEFT JOIN log l"
            " ON l.tenant = r.tenant AND l.domain = r.domain AND l.record_id = r.record_id"
            " AND NOT l.folded"
            " ORDER BY r.tenant, r.domain, r.record_id, l.node_id, l.seq",
            *_key_columns(keys),
        )
        out: dict[RecordKey, StoredRecord] = {}
        for _, grouped in itertools.groupby(rows, key=lambda r: (r[0], r[1], r[2])):
            joined = list(grouped)
            row = _record_row(joined[0])
            tail = tuple(
                _log_entry(r, _RECORD_WIDTH) for r in joined if r[_RECORD_WIDTH] is not None
            )
            out[row.key] = StoredRecord(row, tail)
        return out

    async def record_versions(self, keys: Iterable[RecordKey]) -> dict[RecordKey, int]:
        wanted = sorted(set(keys))
        versions: dict[RecordKey, int] = {}
        for i in range(0, len(wanted), LOAD_CHUNK):
            rows = await self._fetch(
                "SELECT r.tenant, r.domain, r.record_id, r.version"
                " FROM unnest($1::text[], $2::text[], $3::text[]) AS k(tenant, domain, record_id)"
                " JOIN records r"
                " ON r.tenant = k.tenant AND r.domain = k.domain AND r.record_id = k.record_id",
                *_key_columns(wanted[i : i + LOAD_CHUNK]),
            )
            versions.update({RecordKey(t, d, r): int(v) for t, d, r, v in rows})
        return versions

    async def get_record(self, key: RecordKey) -> RecordRow | None:
        rows = await self._fetch(
            f"SELECT {_RECORD_COLUMNS} FROM records"
            " WHERE tenant = $1 AND domain = $2 AND record_id = $3",
            *key,
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
        nodes = sorted(str(r[0]) for r in await self._fetch("SELECT node_id FROM nodes"))
        bu_sql = "" if bus is None else " AND bu = ANY($6::text[])"
        bu_args: tuple[Any, ...] = () if bus is None else (sorted(bus),)
        entries: list[LogEntry] = []
        for node in nodes:
            room = limit - len(entries)
            rows = await self._fetch(
                f"SELECT {_LOG_COLUMNS} FROM log WHERE tenant = $1 AND domain = $2"
                f" AND node_id = $3 AND seq > $4{bu_sql} ORDER BY seq LIMIT $5",
                tenant,
                domain,
                node,
                int(after.get(NodeId(node), 0)),
                room + 1,
                *bu_args,
            )
            entries += await converted(rows[:room], _log_entry)
            if len(rows) > room:
                return entries, True
        return entries, False

    async def read_node_log(self, node_id: NodeId, after: int, limit: int) -> list[LogEntry]:
        rows = await self._fetch(
            f"SELECT {_LOG_COLUMNS} FROM log WHERE node_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            node_id,
            after,
            limit,
        )
        return [_log_entry(r) for r in rows]

    async def log_heads(self) -> dict[NodeId, int]:
        rows = await self._fetch(
            "SELECT n.node_id, (SELECT MAX(seq) FROM log l WHERE l.node_id = n.node_id)"
            " FROM nodes n"
        )
        return {NodeId(str(node)): int(seq) for node, seq in rows if seq is not None}

    async def record_log(self, key: RecordKey) -> list[LogEntry]:
        rows = await self._fetch(
            f"SELECT {_LOG_COLUMNS} FROM log WHERE tenant = $1 AND domain = $2 AND record_id = $3"
            " ORDER BY received_at, node_id, seq",
            *key,
        )
        return [_log_entry(r) for r in rows]

    async def record_decisions(self, key: RecordKey, limit: int) -> list[LogEntry]:
        columns = _LOG_COLUMNS.replace("update_bytes", "''::bytea")
        rows = await self._fetch(
            f"SELECT {columns} FROM log WHERE tenant = $1 AND domain = $2 AND record_id = $3"
            " AND decisions <> '[]' ORDER BY received_at DESC, node_id DESC, seq DESC LIMIT $4",
            *key,
            limit,
        )
        return [_log_entry(r) for r in reversed(rows)]

    async def get_idempotency(
        self, tenant: str, user: str, key: str, now: float
    ) -> IdempotencyRow | None:
        rows = await self._fetch(
            "SELECT request_hash, response, expires_at FROM idempotency"
            " WHERE tenant = $1 AND user_id = $2 AND key = $3 AND expires_at > $4",
            tenant,
            user,
            key,
            now,
        )
        return (
            IdempotencyRow(str(rows[0][0]), bytes(rows[0][1]), float(rows[0][2])) if rows else None
        )

    async def client_owners(self, tenant: str, client_ids: Collection[int]) -> dict[int, str]:
        rows = await self._fetch(
            "SELECT client_id, device FROM client_ids WHERE tenant = $1"
            " AND client_id = ANY($2::bigint[])",
            tenant,
            sorted(set(client_ids)),
        )
        return {int(r[0]): str(r[1]) for r in rows}

    async def records_to_compact(self, min_tail: int, limit: int) -> list[RecordKey]:
        # Reads the whole log (through log_by_record): only `fieldsync compact` asks, and a
        # partial index on unfolded entries would slow every append (postgres_schema.py).
        rows = await self._fetch(
            "SELECT tenant, domain, record_id FROM log WHERE NOT folded"
            " GROUP BY tenant, domain, record_id HAVING COUNT(*) >= $1 LIMIT $2",
            min_tail,
            limit,
        )
        return [RecordKey(str(t), str(d), str(r)) for t, d, r in rows]

    async def quarantined(self, tenant: str) -> list[tuple[str, str, str, bytes]]:
        """(domain, record_id, reason, update) of quarantined updates, oldest first."""
        rows = await self._fetch(
            "SELECT domain, record_id, reason, update_bytes FROM quarantine"
            " WHERE tenant = $1 ORDER BY id",
            tenant,
        )
        return [(str(d), str(r), str(w), bytes(u)) for d, r, w, u in rows]

    # -- helpers -----------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[Row]:
        """One read statement on the pool, tried again when the connection failed."""
        for attempt in itertools.count():
            pool = self._pool
            if pool is None:
                raise StorageUnavailable("the store is not open")
            try:
                return list(await pool.fetch(sql, *args))
            except CONNECTION_ERRORS as exc:
                if attempt >= self._read_retries or self._closing:
                    raise StorageUnavailable(f"read failed: {exc}") from exc
                log.info("read failed (%s); trying again", exc)
            except asyncpg.PostgresError as exc:
                raise StorageUnavailable(f"read failed: {exc}") from exc
            await asyncio.sleep(self._read_backoff * 4**attempt)
        raise AssertionError("unreachable")


_LOG_PARAMS = ", ".join(f"${i}::{t.strip()}" for i, t in enumerate(_LOG_TYPES.split(","), 1))
_INSERT_LOG = f"INSERT INTO log ({_LOG_COLUMNS}) SELECT * FROM unnest({_LOG_PARAMS})"
_LOCK_RECORDS = """
SELECT 1 FROM records r
JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(tenant, domain, record_id)
  ON r.tenant = k.tenant AND r.domain = k.domain AND r.record_id = k.record_id
ORDER BY r.tenant, r.domain, r.record_id
FOR UPDATE OF r
"""
_UPDATE_RECORDS = """
WITH written AS (
    UPDATE records r
    SET state_vector = u.state_vector, materialized = u.materialized, version = u.version,
        updated_at = $8
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::bigint[],
                $7::bigint[]) AS u(tenant, domain, record_id, state_vector, materialized,
                                   version, base)
    WHERE r.tenant = u.tenant AND r.domain = u.domain AND r.record_id = u.record_id
      AND r.version = u.base
    RETURNING 1
)
SELECT COUNT(*) FROM written
"""
_INSERT_RECORDS = """
WITH written AS (
    INSERT INTO records (tenant, domain, record_id, bu, state_vector, materialized, version,
                         created_at, updated_at)
    SELECT *, $8::float8, $8::float8
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[],
                $7::bigint[])
    ON CONFLICT (tenant, domain, record_id) DO NOTHING
    RETURNING 1
)
SELECT COUNT(*) FROM written
"""


def _settings(role: str) -> dict[str, str]:
    # Plan every statement for its arguments: a generic plan cached while the tables
    # were nearly empty scanned a tenant's whole log per record load (seconds, not ms).
    return {"application_name": role, "plan_cache_mode": "force_custom_plan"}


async def _no_reset(conn: Connection) -> None:
    """Pool connections only run single autocommit reads: nothing to reset on release."""


async def _try_lock(conn: Connection, node_id: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT pg_try_advisory_lock(hashtextextended($1 || $2, 0))",
            NODE_LOCK_PREFIX,
            node_id,
        )
    )


async def _unlock(conn: Connection, node_id: str) -> None:
    with contextlib.suppress(*CONNECTION_ERRORS):
        await conn.fetchval(
            "SELECT pg_advisory_unlock(hashtextextended($1 || $2, 0))", NODE_LOCK_PREFIX, node_id
        )


async def _close_connection(conn: Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), timeout=5)
    except Exception:  # noqa: BLE001 - the database is gone: drop the socket
        conn.terminate()


def _key_columns(keys: Sequence[RecordKey]) -> tuple[list[str], list[str], list[str]]:
    return [k.tenant for k in keys], [k.domain for k in keys], [k.record_id for k in keys]


def _log_entry(r: Row, at: int = 0) -> LogEntry:
    return LogEntry(
        position=Position(NodeId(r[at]), Seq(r[at + 1])),
        key=RecordKey(r[at + 2], r[at + 3], r[at + 4]),
        bu=r[at + 5],
        update=bytes(r[at + 6]),
        version=int(r[at + 7]),
        origin=r[at + 8],
        actor=r[at + 9],
        device=r[at + 10],
        decisions=r[at + 11],
        received_at=float(r[at + 12]),
    )


def _record_row(r: Row) -> RecordRow:
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
