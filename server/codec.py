"""Request bodies in, answers out: JSON (bytes as standard base64) or msgpack (bytes as bin).

Both decoders refuse duplicate map keys: a parser that keeps the last of two `roles`
keys is how CouchDB's CVE-2017-12635 happened, so a body either means one thing or is refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any

import msgpack
from aiohttp import web

from .errors import ApiError, ErrorCode

JSON = "application/json"
MSGPACK = "application/msgpack"
_MSGPACK_TYPES = (MSGPACK, "application/x-msgpack", "application/vnd.msgpack")


class DuplicateKey(ValueError):
    pass


def _pairs_to_dict(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(body: bytes) -> Any:
    try:
        return json.loads(body, object_pairs_hook=_pairs_to_dict, parse_constant=_no_constants)
    except DuplicateKey as exc:
        raise _malformed(f"JSON body: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise _malformed(f"JSON body does not parse: {exc}") from None


def decode_msgpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_pairs_to_dict,
            use_list=True,
        )
    except DuplicateKey as exc:
        raise _malformed(f"msgpack body: {exc}") from None
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise _malformed(f"msgpack body does not parse: {exc}") from None


def is_msgpack(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() in _MSGPACK_TYPES


async def read_body(
    request: web.Request, max_bytes: int, idle_timeout_s: float
) -> tuple[bytes, Any, bool]:
    """The raw body, its decoded value, and whether it was msgpack.

    Refuses other media types and bodies over `max_bytes` before reading them whole, and a
    body that sends nothing for `idle_timeout_s` (408).
    """
    content_type = request.headers.get("Content-Type", JSON)
    binary = is_msgpack(content_type)
    if not binary and content_type.split(";")[0].strip().lower() != JSON:
        raise ApiError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"send {JSON} or {MSGPACK}, not {content_type!r}",
        )
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large(max_bytes)
    body = await _read_all(request, max_bytes, idle_timeout_s)
    return body, (decode_msgpack(body) if binary else decode_json(body)), binary


async def _read_all(request: web.Request, max_bytes: int, idle_timeout_s: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            async with asyncio.timeout(idle_timeout_s):
                chunk = await request.content.readany()
        except TimeoutError:
            raise ApiError(
                ErrorCode.REQUEST_TIMEOUT,
                f"the request body sent nothing for {idle_timeout_s:g} s ({size} bytes came)",
            ) from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise too_large(max_bytes)
        chunks.append(chunk)


def too_large(max_bytes: int) -> ApiError:
    return ApiError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"the body is larger than {max_bytes} bytes",
        {"max_bytes": max_bytes},
    )


def wants_msgpack(request: web.Request, default: bool = False) -> bool:
    accept = request.headers.get("Accept", "")
    if any(t in accept for t in _MSGPACK_TYPES):
        return True
    if JSON in accept:
        return False
    return default


def to_bytes(value: Any, binary: bool, what: str) -> bytes:
    """A bytes field of a body: bin in msgpack, a standard base64 string in JSON."""
    if binary:
        if isinstance(value, bytes):
            return value
        raise _malformed(f"{what} must be msgpack bin")
    if not isinstance(value, str):
        raise _malformed(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _malformed(f"{what} is not valid standard base64") from None


def _json_ready(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def encode(payload: Any, binary: bool, status: int = 200) -> web.Response:
    if binary:
        return web.Response(status=status, body=msgpack.packb(payload), content_type=MSGPACK)
    return web.Response(
        status=status,
        body=json.dumps(_json_ready(payload), separators=(",", ":")).encode(),
        content_type=JSON,
    )


def _malformed(message: str) -> ApiError:
    return ApiError(ErrorCode.MALFORMED_BODY, message)
