"""Prometheus metrics, one registry per app (so tests can run many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.items = Counter(
            "fieldsync_push_items_total",
            "Pushed items by domain and result status",
            ["domain", "status"],
            registry=r,
        )
        self.item_errors = Counter(
            "fieldsync_push_item_errors_total", "Push item errors by code", ["code"], registry=r
        )
        self.decisions = Counter(
            "fieldsync_decisions_total", "Compensations by rule", ["rule"], registry=r
        )
        self.push_seconds = Histogram(
            "fieldsync_push_seconds",
            "Push request latency",
            ["domain"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.pulled = Counter(
            "fieldsync_pull_changes_total", "Changes served by pull", ["domain"], registry=r
        )
        self.http_errors = Counter(
            "fieldsync_http_errors_total", "Error answers by code", ["code"], registry=r
        )
        self.rate_limited = Counter(
            "fieldsync_rate_limited_total",
            "Requests refused by a rate limit",
            ["scope"],
            registry=r,
        )
        self.rate_limited_held = Counter(
            "fieldsync_rate_limited_held_total",
            "429s held until the Retry-After the client was given before was up",
            registry=r,
        )
        self.rate_limited_quick = Counter(
            "fieldsync_rate_limited_quick_total",
            "429s answered in front of aiohttp (server/quick_refusals.py)",
            registry=r,
        )
        self.open_sockets = Gauge(
            "fieldsync_open_sockets", "Open device and Yjs sockets", registry=r
        )
        self.live_feeds = Gauge(
            "fieldsync_live_feeds", "Live change feeds (socket subscriptions)", registry=r
        )
        self.merge_retries = Gauge(
            "fieldsync_merge_retries",
            "Merges done again since start: another node wrote the record first",
            registry=r,
        )
        self.peer_entries = Gauge(
            "fieldsync_peer_entries",
            "Log entries read from other nodes since start (and fanned out here)",
            registry=r,
        )
        self.live_records = Gauge(
            "fieldsync_live_records", "Record docs held in memory", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
