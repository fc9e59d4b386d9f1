"""Reading the items of a Yjs v1 update: who wrote what, where, with which value.

pycrdt shows a doc's current values only. A map write that loses to a concurrent
write of the same key (Yjs orders them by client id) is deleted the moment it
integrates, and the doc's garbage collection drops its value: nothing in the doc
says it was ever there. Rules such as "a status only moves forward" must see such
writes, so the server reads them from the update bytes themselves.

The layout follows Yjs ``Item.write`` (see ``crdt_models.yupdate``
for the format notes). The input must already have passed the update gate
(``inspect_update``) or come from yrs itself: this reader checks nothing and
raises ``IndexError``/``ValueError`` on bytes it cannot read. The delete set
at the end is not read.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

ItemId = tuple[int, int]
"""``(client, clock)``."""


class _NotScalar:
    """A value that is not a plain scalar (a container, bytes, a nested type...)."""

    def __repr__(self) -> str:
        return "NOT_SCALAR"


NOT_SCALAR = _NotScalar()


@dataclass(frozen=True, slots=True)
class Item:
    """One item struct. ``value`` is set for a single-value ContentAny (what a map write
    carries), as pycrdt would show it (every number a float); otherwise ``NOT_SCALAR``."""

    client: int
    clock: int
    length: int
    origin: ItemId | None
    right_origin: ItemId | None
    parent_root: str | None
    parent_item: ItemId | None
    key: str | None
    value: object = NOT_SCALAR


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def varuint(self) -> int:
        value = 0
        shift = 0
        while True:
            b = self.data[self.pos]
            self.pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    def varint(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        value = b & 0x3F
        negative = bool(b & 0x40)
        shift = 6
        while b & 0x80:
            b = self.data[self.pos]
            self.pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
        return -value if negative else value

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise IndexError("read past the end of the update")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def string(self) -> str:
        return self.take(self.varuint()).decode("utf-8")

    def item_id(self) -> ItemId:
        return self.varuint(), self.varuint()

    def any(self) -> object:
        """One lib0 ``any``: a scalar as pycrdt shows it, or NOT_SCALAR (skipped)."""
        tag = self.data[self.pos]
        self.pos += 1
        if tag == 119:
            return self.string()
        if tag == 125:
            return float(self.varint())
        if tag == 124:
            return float(struct.unpack(">f", self.take(4))[0])
        if tag == 123:
            return float(struct.unpack(">d", self.take(8))[0])
        if tag == 122:
            return float(struct.unpack(">q", self.take(8))[0])
        if tag in (126, 127):
            return None
        if tag in (120, 121):
            return tag == 120
        if tag == 118:
            for _ in range(self.varuint()):
                self.string()
                self.any()
        elif tag == 117:
            for _ in range(self.varuint()):
                self.any()
        elif tag == 116:
            self.take(self.varuint())
        else:
            raise ValueError(f"unknown lib0 any type {tag}")
        return NOT_SCALAR


def _utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le")) >> 1


def _content(r: _Reader, ref: int) -> tuple[int, object]:
    """Read an item's content: ``(length in clock units, value)``."""
    if ref == 8:  # ContentAny
        n = r.varuint()
        values = [r.any() for _ in range(n)]
        return n, values[0] if n == 1 else NOT_SCALAR
    if ref == 4:  # ContentString
        return _utf16_units(r.string()), NOT_SCALAR
    if ref == 1:  # ContentDeleted
        return r.varuint(), NOT_SCALAR
    if ref == 2:  # ContentJSON
        n = r.varuint()
        for _ in range(n):
            r.string()
        return n, NOT_SCALAR
    if ref == 7:  # ContentType
        if r.varuint() in (3, 5):
            r.string()
        return 1, NOT_SCALAR
    if ref == 3:  # ContentBinary
        r.take(r.varuint())
    elif ref in (5, 6):  # ContentEmbed, ContentFormat
        r.string()
        if ref == 6:
            r.string()
    elif ref == 9:  # ContentDoc
        r.string()
        r.any()
    else:
        raise ValueError(f"unknown content ref {ref}")
    return 1, NOT_SCALAR


def _item(r: _Reader, info: int, client: int, clock: int) -> Item:
    origin = r.item_id() if info & 0x80 else None
    right_origin = r.item_id() if info & 0x40 else None
    parent_root = parent_item = key = None
    if not info & 0xC0:
        if r.varuint() == 1:
            parent_root = r.string()
        else:
            parent_item = r.item_id()
        if info & 0x20:
            key = r.string()
    length, value = _content(r, info & 0x1F)
    return Item(client, clock, length, origin, right_origin, parent_root, parent_item, key, value)


def read_items(data: bytes) -> list[Item]:
    """The item structs of an update (GC and Skip structs left out)."""
    r = _Reader(data)
    items: list[Item] = []
    for _ in range(r.varuint()):
        count, client, clock = r.varuint(), r.varuint(), r.varuint()
        for _ in range(count):
            info = r.data[r.pos]
            r.pos += 1
            ref = info & 0x1F
            if ref in (0, 10):  # GC, Skip
                clock += r.varuint()
                continue
            item = _item(r, info, client, clock)
            items.append(item)
            clock += item.length
    return items


class ItemPlaces:
    """Where the items of a doc live: ``(root name, map key)`` by item id.

    Filled from a doc's full state (``doc.get_update()``), which keeps every item's
    origins even after its value was collected, then from each diff since (``add``).
    An item written with an origin does not carry its parent: it takes its origin's
    (or right origin's), as Yjs does.
    """

    def __init__(self) -> None:
        self._starts: dict[int, list[int]] = {}
        self._items: dict[int, list[Item]] = {}
        self._places: dict[ItemId, tuple[str, str | None] | None] = {}

    def add(self, update: bytes) -> None:
        """Index the items of ``update``. A client's items must arrive in clock order, as
        a doc's full state and then its diffs give them."""
        for item in read_items(update):
            self._starts.setdefault(item.client, []).append(item.clock)
            self._items.setdefault(item.client, []).append(item)

    def _find(self, item_id: ItemId) -> Item | None:
        starts = self._starts.get(item_id[0])
        if not starts:
            return None
        i = bisect.bisect_right(starts, item_id[1]) - 1
        if i < 0:
            return None
        item = self._items[item_id[0]][i]
        return item if item_id[1] < item.clock + item.length else None

    def place(self, item_id: ItemId) -> tuple[str, str | None] | None:
        """``(root, key)`` of the item holding ``item_id``; None if it is not directly in
        a root type, or not indexed (yet). Iterative: a key overwritten n times is a chain
        of n, remembered once walked."""
        chain: list[ItemId] = []
        current: ItemId | None = item_id
        found: tuple[str, str | None] | None = None
        known = True
        while current is not None:
            if current in self._places:
                found = self._places[current]
                break
            chain.append(current)
            item = self._find(current)
            if item is None:
                known = False  # a later diff may bring it: nothing to remember
                break
            if item.parent_item is not None:
                break
            if item.parent_root is not None:
                found = (item.parent_root, item.key)
                break
            current = item.origin if item.origin is not None else item.right_origin
        if known:
            for seen in chain:
                self._places[seen] = found
        return found
