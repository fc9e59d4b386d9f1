"""PostgreSQL schema, as ordered migrations tracked in the `schema_version` table.

The tables mean what the SQLite schema's do (storage/sqlite_schema.py). Migrations run
in one transaction under an advisory lock, so nodes starting together do not race.
"""

from __future__ import annotations

MIGRATION_LOCK = "fieldsync-migrate"
"""Name of the transaction-level advisory lock the migrations run under."""

SCHEMA_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied_at DOUBLE PRECISION NOT NULL
)
"""

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema
    """
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        client_id BIGINT NOT NULL UNIQUE,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE records (
        tenant TEXT NOT NULL,
        domain TEXT NOT NULL,
        record_id TEXT NOT NULL,
        bu TEXT NOT NULL,
        snapshot BYTEA,
        state_vector BYTEA NOT NULL,
        materialized TEXT NOT NULL,
        version BIGINT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (tenant, domain, record_id)
    );
    CREATE TABLE log (
        node_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        tenant TEXT NOT NULL,
        domain TEXT NOT NULL,
        record_id TEXT NOT NULL,
        bu TEXT NOT NULL,
        version BIGINT NOT NULL,
        update_bytes BYTEA NOT NULL,
        origin TEXT NOT NULL,
        actor TEXT NOT NULL,
        device TEXT,
        decisions TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        folded BOOLEAN NOT NULL DEFAULT FALSE,
        PRIMARY KEY (node_id, seq)
    );
    -- pulls: one node's entries of a tenant/domain past a position. node_id leads so
    -- this index cannot serve a record's load: before the first ANALYZE the planner
    -- rated (tenant, domain, node_id, seq) as good as log_by_record and scanned a
    -- tenant's whole log for each record it loaded.
    CREATE INDEX log_by_scope ON log (node_id, tenant, domain, seq);
    -- loads and record_log: one record's entries
    CREATE INDEX log_by_record ON log (tenant, domain, record_id, node_id, seq);
    -- No partial index on unfolded entries: every append would pay for it (about a
    -- quarter more per 100-entry group, measured), and records_to_compact, which would
    -- use it, only serves `fieldsync compact`; the server compacts what merges report.
    CREATE TABLE idempotency (
        tenant TEXT NOT NULL,
        user_id TEXT NOT NULL,
        key TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        response BYTEA NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (tenant, user_id, key)
    );
    CREATE INDEX idempotency_expiry ON idempotency (expires_at);
    CREATE TABLE client_ids (
        tenant TEXT NOT NULL,
        client_id BIGINT NOT NULL,
        device TEXT NOT NULL,
        claimed_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (tenant, client_id)
    );
    CREATE TABLE quarantine (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        tenant TEXT NOT NULL,
        domain TEXT NOT NULL,
        record_id TEXT NOT NULL,
        actor TEXT NOT NULL,
        device TEXT,
        reason TEXT NOT NULL,
        update_bytes BYTEA NOT NULL,
        received_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX quarantine_by_tenant ON quarantine (tenant, id);
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
