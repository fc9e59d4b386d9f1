"""Assembling pulled changes: one merged update per record per page, and the next cursor.

Shared by HTTP pull and the device socket, so both answer the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pycrdt import merge_updates

from storage.types import LogEntry, NodeId

from .gate import DocFailed, contained
from .slices import Slices


def advance(clock: Mapping[NodeId, int], entries: list[LogEntry]) -> dict[NodeId, int]:
    out = dict(clock)
    for e in entries:
        node, seq = e.position
        if seq > out.get(node, 0):
            out[node] = seq
    return out


async def merge_page(entries: list[LogEntry]) -> list[dict[str, Any]]:
    """One change per record: its updates in this page merged into one.

    In time slices: merging a page of 5,000 entries took 19-29 ms (measured), and other
    tenants' requests waited it out.
    """
    by_record: dict[str, list[LogEntry]] = {}
    for e in entries:
        by_record.setdefault(e.key.record_id, []).append(e)
    page = []
    slices = Slices()
    for record_id, group in by_record.items():
        await slices.pause()
        for update in _merged(group):
            page.append(
                {
                    "record_id": record_id,
                    "bu": group[-1].bu,
                    "version": max(e.version for e in group),
                    "update": update,
                }
            )
    return page


def _merged(group: list[LogEntry]) -> list[bytes]:
    if len(group) == 1:
        return [group[0].update]
    try:
        merged: bytes = contained("merge_updates", merge_updates, *(e.update for e in group))
        return [merged]
    except DocFailed:
        return [e.update for e in group]
