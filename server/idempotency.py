"""Idempotency-Key: a retried push gets the stored answer; a reused key with another body is 409.

Keys are scoped to (tenant, user) and kept 24 h. The answer is stored in the same
transaction as the push itself, so a key is either fully applied and answered or unused.
Concurrent requests with one key run one at a time.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack

from storage import Store
from storage.types import IdempotencyWrite

from .errors import ApiError, ErrorCode
from .keyed_locks import KeyedLocks

MAX_KEY_LEN = 255


def request_hash(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


class Idempotency:
    def __init__(self, store: Store, ttl_s: float) -> None:
        self._store = store
        self._ttl = ttl_s
        self._locks: KeyedLocks[tuple[str, str, str]] = KeyedLocks()

    @asynccontextmanager
    async def exclusive(self, tenant: str, user: str, key: str) -> AsyncIterator[None]:
        """Serialize requests that share one key."""
        if not 0 < len(key) <= MAX_KEY_LEN or not key.isprintable():
            raise ApiError(
                ErrorCode.BAD_REQUEST,
                f"Idempotency-Key must be 1-{MAX_KEY_LEN} printable characters",
            )
        async with self._locks.exclusive((tenant, user, key)):
            yield

    async def replay(self, tenant: str, user: str, key: str, digest: str) -> Any | None:
        """The stored answer for this key and body, None if the key is unused."""
        row = await self._store.get_idempotency(tenant, user, key, time.time())
        if row is None:
            return None
        if row.request_hash != digest:
            raise ApiError(
                ErrorCode.IDEMPOTENCY_MISMATCH,
                "this Idempotency-Key was already used with a different request body",
            )
        return msgpack.unpackb(row.response, raw=False)

    def record(
        self, tenant: str, user: str, key: str, digest: str, answer: Any
    ) -> IdempotencyWrite:
        return IdempotencyWrite(
            tenant, user, key, digest, msgpack.packb(answer), time.time() + self._ttl
        )
