"""Server settings: one frozen value built by the CLI (or tests) and handed to the app."""

from __future__ import annotations

from dataclasses import dataclass, field

from crdt_models.context import RuleSettings

from .ratelimit import RateSettings


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 32 << 20
    max_items: int = 1000
    max_update_bytes: int = 1 << 20
    max_state_vector_bytes: int = 64 << 10
    max_clients_per_update: int = 1000
    max_record_id_len: int = 128
    max_pull_limit: int = 5000
    default_pull_limit: int = 500
    body_idle_timeout_s: float = 30.0
    """A request body that sends nothing for this long is answered 408: slow uploads from a
    bad network go through, a stalled (or slowloris) body does not hold its connection."""


@dataclass(frozen=True, slots=True)
class SocketSettings:
    hello_timeout_s: float = 10.0
    heartbeat_s: float = 30.0
    max_frame_bytes: int = 16 << 20
    max_pending_pushes: int = 8
    catch_up_page: int = 500
    buffer_entries: int = 2000
    buffer_bytes: int = 4 << 20
    allowed_origins: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Config:
    db: str
    jwt_secret: str
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_public_key: str | None = None
    node_id: str | None = None
    node_file: str | None = None  # where a node on a shared database keeps its registered id
    peer_poll_s: float = 2.0  # how often to look for other nodes' commits besides notices
    limits: Limits = field(default_factory=Limits)
    sockets: SocketSettings = field(default_factory=SocketSettings)
    rates: RateSettings = field(default_factory=RateSettings)
    rules: RuleSettings = field(default_factory=RuleSettings)
    cache_size: int = 10_000
    idempotency_ttl_s: float = 24 * 3600
    compaction_min_tail: int = 64
    compaction_interval_s: float = 30.0
    jwt_leeway_s: float = 30.0
