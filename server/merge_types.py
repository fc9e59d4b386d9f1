"""What goes in and out of the merge pipeline: push items, their results, and who pushes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from crdt_models.context import Origin

from .auth import Principal
from .errors import ItemError


class PushItem(NamedTuple):
    record_id: str
    bu: str | None
    update: bytes | None
    state_vector: bytes | None


@dataclass(slots=True)
class ItemResult:
    record_id: str
    status: str
    version: int = 0
    update: bytes | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    error: ItemError | None = None
    state_vector: bytes | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "record_id": self.record_id,
            "status": self.status,
            "version": self.version,
            "update": self.update,
            "decisions": self.decisions,
            "error": self.error.to_wire() if self.error else None,
        }
        if self.state_vector is not None:
            out["state_vector"] = self.state_vector
        return out


@dataclass(frozen=True, slots=True)
class Actor:
    """Who pushes: the principal, the device, and how the change is attributed."""

    principal: Principal
    device: str | None
    origin: Origin = Origin.DEVICE
