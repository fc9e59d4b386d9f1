"""One JSON error shape for every failure an HTTP request can meet."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from storage import StorageUnavailable

from .errors import ApiError, ErrorCode, error_response

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: ErrorCode.BAD_REQUEST,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _counted(request, exc.response(), exc.code)
    except StorageUnavailable as exc:
        log.error("storage unavailable during %s %s: %s", request.method, request.path, exc)
        response = error_response(
            503,
            ErrorCode.STORAGE_UNAVAILABLE,
            "storage is unavailable; nothing was saved, retry",
            headers={"Retry-After": "1"},
        )
        return _counted(request, response, ErrorCode.STORAGE_UNAVAILABLE)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, ErrorCode.BAD_REQUEST)
        return _counted(request, error_response(exc.status, code, exc.reason), code)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        response = error_response(500, ErrorCode.INTERNAL, "internal error")
        return _counted(request, response, ErrorCode.INTERNAL)


def _counted(request: web.Request, response: web.Response, code: str) -> web.Response:
    from .services import SERVICES

    svc = request.app.get(SERVICES)
    if svc is not None:
        svc.metrics.http_errors.labels(code).inc()
    return response
