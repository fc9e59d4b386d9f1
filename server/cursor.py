"""Vector-clock cursors: `{node_id: seq}`, opaque to clients (base64url msgpack).

A cursor is bound to the tenant and domain it was issued for, so it cannot be replayed
to page another scope.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping

import msgpack

from storage.types import NodeId

from .errors import ApiError, ErrorCode

VERSION = 1
MAX_NODES = 128
MAX_CURSOR_CHARS = 4096


def _scope_tag(tenant: str, domain: str) -> bytes:
    return hashlib.blake2b(f"{tenant}\x00{domain}".encode(), digest_size=8).digest()


def encode_cursor(tenant: str, domain: str, clock: Mapping[NodeId, int]) -> str:
    raw = msgpack.packb({"v": VERSION, "s": _scope_tag(tenant, domain), "c": dict(clock)})
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(tenant: str, domain: str, cursor: str | None) -> dict[NodeId, int]:
    if not cursor:
        return {}
    if len(cursor) > MAX_CURSOR_CHARS:
        raise _invalid("the cursor is too long")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (binascii.Error, ValueError, msgpack.UnpackException):
        raise _invalid("the cursor is not one this server issued") from None
    if not isinstance(data, dict) or data.get("v") != VERSION:
        raise _invalid("the cursor is not one this server issued")
    if data.get("s") != _scope_tag(tenant, domain):
        raise _invalid("the cursor belongs to another domain or tenant")
    clock = data.get("c")
    if not isinstance(clock, dict) or len(clock) > MAX_NODES:
        raise _invalid("the cursor is not one this server issued")
    if not all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in clock.items()):
        raise _invalid("the cursor is not one this server issued")
    return {NodeId(k): v for k, v in clock.items()}


def _invalid(message: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_CURSOR, message)
