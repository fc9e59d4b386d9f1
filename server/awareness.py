"""Awareness (who is looking at a record, cursors, presence): relayed between a record's peers.

Awareness is ephemeral and lossy by design: it is never stored, and a peer too slow to
take an awareness frame loses it. When a peer leaves, its awareness clients are
announced as gone ("null" state), as the reference server does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

from storage import RecordKey

from .yprotocol import AWARENESS, BadMessage, Reader, message, write_var_uint

MAX_AWARENESS_STATE = 64 << 10


class AwarenessPeer(Protocol):
    awareness_clients: set[int]

    def send_soon(self, frame: bytes) -> None: ...


@dataclass
class Room:
    """The live peers of one record on this node, and their awareness states."""

    peers: set[AwarenessPeer] = field(default_factory=set)
    awareness: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # client -> clock, state

    def encoded(self, clients: list[int] | None = None) -> bytes | None:
        chosen = list(self.awareness) if clients is None else clients
        if not chosen:
            return None
        body = bytearray()
        write_var_uint(body, len(chosen))
        for client in chosen:
            clock, state = self.awareness[client]
            body += message(client, clock, state)
        return message(AWARENESS, bytes(body))


def parse_awareness(data: bytes) -> list[tuple[int, int, bytes]]:
    reader = Reader(data)
    count = reader.var_uint()
    if count > len(data):
        raise BadMessage("awareness count past the end")
    entries = []
    for _ in range(count):
        client, clock, state = reader.var_uint(), reader.var_uint(), reader.var_bytes()
        if len(state) > MAX_AWARENESS_STATE:
            raise BadMessage("awareness state too large")
        try:
            json.loads(state)  # must be JSON (or "null": the client left)
        except ValueError:
            raise BadMessage("awareness state is not JSON") from None
        entries.append((client, clock, state))
    reader.done()
    return entries


class Rooms:
    def __init__(self) -> None:
        self._rooms: dict[RecordKey, Room] = {}

    def join(self, key: RecordKey, peer: AwarenessPeer) -> Room:
        room = self._rooms.setdefault(key, Room())
        room.peers.add(peer)
        return room

    def leave(self, key: RecordKey, peer: AwarenessPeer) -> None:
        room = self._rooms.get(key)
        if room is None:
            return
        room.peers.discard(peer)
        gone = [c for c in peer.awareness_clients if c in room.awareness]
        for client in gone:
            clock, _ = room.awareness[client]
            room.awareness[client] = (clock + 1, b"null")
        frame = room.encoded(gone) if gone else None
        for client in gone:
            del room.awareness[client]
        if frame is not None:
            for other in room.peers:
                other.send_soon(frame)
        if not room.peers:
            del self._rooms[key]
