"""Who is merging, when, where, and under which settings: what rules may ask about.

``Context`` is built by the server for every merge; ``RuleSettings`` carries the
tenant's or node's configuration (clock skew, GPS accuracy limit, bu geofences).
Everything here is frozen and has defaults, so a rule never sees half a context.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crdt_models.written import WrittenValues


class Origin(StrEnum):
    """Who made the change being checked."""

    DEVICE = "device"
    BACKOFFICE = "backoffice"
    SERVER = "server"


@dataclass(frozen=True)
class Geofence:
    """A circle around a site: punches farther than ``radius_m`` from the center are refused."""

    lat: float
    lon: float
    radius_m: float

    def __post_init__(self) -> None:
        if not (-90 <= self.lat <= 90 and -180 <= self.lon <= 180):
            raise ValueError(f"geofence center ({self.lat}, {self.lon}) is not a coordinate")
        if not (math.isfinite(self.radius_m) and self.radius_m > 0):
            raise ValueError(
                f"geofence radius must be a positive number of metres, not {self.radius_m}"
            )


def _no_geofences() -> Mapping[str, Geofence]:
    return MappingProxyType({})


@dataclass(frozen=True)
class RuleSettings:
    """Configuration the rules read; the defaults suit a server with no configuration."""

    clock_skew: timedelta = timedelta(minutes=5)
    """How far in the future (by the server's clock) a device's punch time may be."""
    max_accuracy_m: float = 100.0
    """Largest GPS ``accuracy`` (metres) an attendance punch may report."""
    geofences: Mapping[str, Geofence] = field(default_factory=_no_geofences, hash=False)
    """bu id -> its geofence; a bu without one has no geofence check."""

    def __post_init__(self) -> None:
        if self.clock_skew < timedelta(0):
            raise ValueError("clock_skew must not be negative")
        if not (math.isfinite(self.max_accuracy_m) and self.max_accuracy_m >= 0):
            raise ValueError("max_accuracy_m must be a finite number >= 0")
        object.__setattr__(self, "geofences", MappingProxyType(dict(self.geofences)))


DEFAULT_SETTINGS = RuleSettings()


@dataclass(frozen=True)
class Context:
    """Who is merging, and when (``now`` must be timezone-aware), for which bu, under what settings.

    ``user`` is the principal the change is attributed to (the device's user, the
    back-office user, or the server's own name for ``Origin.SERVER`` jobs).
    ``written`` reads the values the merged updates wrote, including those a
    concurrent write hid (None: the merge wrote through the server, nothing is hidden).
    """

    user: str
    roles: frozenset[str]
    device: str | None
    origin: Origin
    now: datetime
    bu: str | None = None
    settings: RuleSettings = DEFAULT_SETTINGS
    written: WrittenValues | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.now.tzinfo is None:
            raise ValueError("Context.now must be timezone-aware")

    def has_role(self, role: str) -> bool:
        return role in self.roles

    @property
    def geofence(self) -> Geofence | None:
        """The geofence of this merge's bu, if it has one."""
        return None if self.bu is None else self.settings.geofences.get(self.bu)
