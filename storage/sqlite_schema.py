"""SQLite schema, as ordered migrations tracked by `PRAGMA user_version`."""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema
    """
    CREATE TABLE meta (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        client_id INTEGER NOT NULL UNIQUE,
        created_at REAL NOT NULL
    );
    CREATE TABLE records (
        tenant TEXT NOT NULL,
        domain TEXT NOT NULL,
        record_id TEXT NOT NULL,
        bu TEXT NOT NULL,
        snapshot BLOB,
        state_vector BLOB NOT NULL,
        materialized TEXT NOT NULL,
        version INTEGER NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (tenant, domain, record_id)
    );
    CREATE TABLE log (
        node_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        domain TEXT NOT NULL,
        record_id TEXT NOT NULL,
        bu TEXT NOT NULL,
        version INTEGER NOT NULL,
        update_bytes BLOB NOT NULL,
        origin TEXT NOT NULL,
        actor TEXT NOT NULL,
        device TEXT,
        decisions TEXT NOT NULL,
        received_at REAL NOT NULL,
        folded INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (node_id, seq)
    );
    CREATE INDEX log_by_scope ON log (tenant, domain, node_id, seq);
    CREATE INDEX log_by_record ON log (tenant, domain, record_id, node_id, seq);
    CREATE INDEX log_unfolded ON log (tenant, domain, record_id) WHERE folded = 0;
    CREATE TABLE idempotency (
        tenant TEXT NOT NULL,
        user_id TEXT NOT NULL,
        key TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        response BLOB NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (tenant, user_id, key)
    );
    CREATE TABLE client_ids (
        tenant TEXT NOT NULL,
        client_id INTEGER NOT NULL,
        device TEXT NOT NULL,
        claimed_at REAL NOT NULL,
        PRIMARY KEY (tenant, client_id)
    );
    CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant TEXT NOT NULL,
        domain TEXT NOT NULL,
        record_id TEXT NOT NULL,
        actor TEXT NOT NULL,
        device TEXT,
        reason TEXT NOT NULL,
        update_bytes BLOB NOT NULL,
        received_at REAL NOT NULL
    );
    """,
    # 2: loads read the tail through log_by_record; the partial index cost every append
    """
    DROP INDEX log_unfolded;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
