"""Storage for fieldsync: one small async contract and its backends."""

from __future__ import annotations

from .base import RecordConflict, StorageError, StorageUnavailable, Store
from .types import RecordKey

__all__ = [
    "RecordConflict",
    "RecordKey",
    "StorageError",
    "StorageUnavailable",
    "Store",
    "open_store",
]


def open_store(db: str) -> Store:
    """The Store for a `--db` value: a PostgreSQL URL or a SQLite file path."""
    if db.startswith(("postgres://", "postgresql://")):
        from .postgres import PostgresStore

        return PostgresStore(db)
    from .sqlite import SQLiteStore

    return SQLiteStore(db)
