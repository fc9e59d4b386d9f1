"""The update gate: the trust boundary between device bytes and pycrdt.

byte caps -> structural pre-check (crdt_models.yupdate) -> apply with every failure
contained, Rust panics included (`pyo3_runtime.PanicException` is a BaseException).
A doc that raised is unusable (it may be half-applied): the caller discards it and
reloads from storage, where nothing was written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from pycrdt import Doc

from crdt_models.yupdate import (
    OWN_DOC_LIMITS,
    MalformedUpdate,
    UpdateShape,
    inspect_state_vector,
    inspect_update,
)
from crdt_models.yupdate import Limits as ParseLimits

from .config import Limits
from .errors import ErrorCode, ItemError

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

_NEVER_CONTAIN = (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError)


class DocFailed(Exception):
    """pycrdt raised (or panicked) while working on a doc; the doc must be discarded."""


class UpdateGate:
    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._update_limits = ParseLimits(
            max_bytes=limits.max_update_bytes, max_clients=limits.max_clients_per_update
        )
        self._sv_limits = ParseLimits(
            max_bytes=limits.max_state_vector_bytes, max_clients=limits.max_clients_per_update
        )

    def check_update(self, data: bytes) -> UpdateShape:
        if len(data) > self._limits.max_update_bytes:
            raise ItemError(
                ErrorCode.MALFORMED_UPDATE,
                f"the update is {len(data)} bytes; at most {self._limits.max_update_bytes}",
            )
        try:
            return inspect_update(data, self._update_limits)
        except MalformedUpdate as exc:
            raise ItemError(ErrorCode.MALFORMED_UPDATE, f"not a Yjs v1 update: {exc}") from None

    def check_state_vector(self, data: bytes) -> dict[int, int]:
        try:
            return inspect_state_vector(data, self._sv_limits)
        except MalformedUpdate as exc:
            raise ItemError(
                ErrorCode.MALFORMED_STATE_VECTOR, f"not a Yjs state vector: {exc}"
            ) from None


def contained(what: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run one pycrdt call; any failure, panics included, becomes DocFailed."""
    try:
        return fn(*args, **kwargs)
    except _NEVER_CONTAIN:
        raise
    except BaseException as exc:  # noqa: BLE001 - the trust boundary: Rust panics are BaseException
        log.warning("pycrdt failed during %s: %s: %s", what, type(exc).__name__, exc)
        raise DocFailed(f"{type(exc).__name__}: {exc}") from None


def apply_update(doc: Doc[Any], update: bytes) -> None:
    contained("apply_update", doc.apply_update, update)


def diff(doc: Doc[Any], state_vector: bytes) -> bytes:
    result: bytes = contained("get_update", doc.get_update, state_vector)
    return result


def state_of(doc: Doc[Any]) -> dict[int, int]:
    """The doc's state vector, decoded."""
    raw: bytes = contained("get_state", doc.get_state)
    return inspect_state_vector(raw, OWN_DOC_LIMITS)
