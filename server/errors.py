"""Every error code the API can answer, and the one JSON error shape.

HTTP errors are `{"error": {"code", "message", "details"}}`; item errors inside a push
answer are `{"code", "message"}`. Codes are stable strings clients can switch on.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from aiohttp import web


class ErrorCode(StrEnum):
    # request-level
    BAD_REQUEST = "bad_request"
    MALFORMED_BODY = "malformed_body"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    IDEMPOTENCY_MISMATCH = "idempotency_mismatch"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    INVALID_RECORD = "invalid_record"
    TOO_MANY_ITEMS = "too_many_items"
    INVALID_CURSOR = "invalid_cursor"
    RATE_LIMITED = "rate_limited"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    INTERNAL = "internal_error"
    # item-level
    INVALID_ITEM = "invalid_item"
    MALFORMED_UPDATE = "malformed_update"
    MALFORMED_STATE_VECTOR = "malformed_state_vector"
    UPDATE_REJECTED = "update_rejected"
    CLIENT_ID_OWNED = "client_id_owned"
    BU_MISMATCH = "bu_mismatch"
    RECORD_UNAVAILABLE = "record_unavailable"


STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.MALFORMED_BODY: 400,
    ErrorCode.INVALID_CURSOR: 400,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.IDEMPOTENCY_MISMATCH: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.REQUEST_TIMEOUT: 408,
    ErrorCode.INVALID_RECORD: 422,
    ErrorCode.TOO_MANY_ITEMS: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.STORAGE_UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


class ApiError(Exception):
    """An error answered to the client as the JSON error shape."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        details: dict[str, Any] | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}
        self.status = status or STATUS.get(code, 400)
        self.headers = headers or {}

    def response(self) -> web.Response:
        return error_response(self.status, self.code, self.message, self.details, self.headers)


class ItemError(Exception):
    """One push item cannot be merged; the rest of the batch goes on."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_wire(self) -> dict[str, str]:
        return {"code": str(self.code), "message": self.message}


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    return json.dumps(
        {"error": {"code": code, "message": message, "details": details or {}}}
    ).encode()


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(code, message, details),
        content_type="application/json",
        headers=headers,
    )
