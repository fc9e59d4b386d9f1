"""The field values a merge wrote, including those a concurrent write hid.

Two phones that set one field offline each show their own value; when the server
merges them, Yjs keeps the value of the higher client id and deletes the other the
moment it arrives. For most fields that is the answer everyone expects. For a status
that only moves forward or an escalation level it is a lost edit: a COMPLETED hidden
behind a concurrent INPROGRESS moves the task back on the phone that completed it,
and an escalation hidden behind a lower level is never seen. Rules ask
:class:`WrittenValues` for such values (``rules_common.keep_hidden_advance``), and a
rule that refuses a value asks it for the last acceptable one the device wrote before
it in the same merge (``rules_common.written_before``): delivered one update at a time,
that one would have stood.

Reading them costs a parse of the merged updates; finding which field a write went
to needs the doc's items (:class:`DocPlaces`): parsed only when a written value would
matter (``wanted``), once per cached doc, then only what was added since.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from crdt_models.record import FIELDS_ROOT, RecordDoc
from crdt_models.yitems import NOT_SCALAR, Item, ItemPlaces, read_items

_UNREADABLE = (IndexError, ValueError)


class DocPlaces:
    """An :class:`ItemPlaces` of one doc, brought up to date on each use by parsing only
    the structs the doc gained since (a record's doc can hold tens of thousands of items;
    parsing them all on every merge that needs one would cost more than the merge)."""

    def __init__(self) -> None:
        self._places = ItemPlaces()
        self._state = b"\x00"  # the encoded state vector indexed so far (none)

    def of(self, doc: RecordDoc) -> ItemPlaces:
        state: bytes = doc.get_state()
        if state != self._state:
            self._places.add(doc.get_update(self._state))
            self._state = state
        return self._places


class WrittenValues:
    """The scalar values ``updates`` wrote to the ``fields`` map of ``doc`` in one merge.

    ``before``/``after`` are the doc's state vectors around the merge: only items the
    merge integrated count (a re-sent update writes nothing). A value the writer itself
    overwrote within the merged updates counts too: delivered one update at a time it
    would have been seen, and a step back from it refused. ``places`` gives the doc's
    item index, asked for only when needed (a cached record keeps its own).
    """

    def __init__(
        self,
        doc: RecordDoc,
        updates: Sequence[bytes],
        before: Mapping[int, int],
        after: Mapping[int, int],
        places: Callable[[], DocPlaces] = DocPlaces,
    ) -> None:
        self._doc = doc
        self._updates = updates
        self._before = before
        self._after = after
        self._items: list[Item] | None = None
        self._doc_places = places
        self._places: ItemPlaces | None = None

    def for_field(
        self, name: str, wanted: Callable[[object], bool], spelled: Iterable[str] | None = None
    ) -> list[object]:
        """The values written to ``fields[name]`` that ``wanted`` accepts, in update order.

        ``spelled``: when the wanted values are a known set of strings, they are looked for
        in the update bytes first, and the updates are parsed only if one is there (a Yjs
        string is stored as its UTF-8 bytes): most merges then cost a substring search.
        """
        if spelled is not None and not self._mention(spelled):
            return []
        return [item.value for item in self._items_of(name, wanted)]

    def last_for_field(self, name: str, wanted: Callable[[object], bool]) -> list[object]:
        """The last value written to ``fields[name]`` that ``wanted`` accepts (a list of one,
        or empty), by the order it was written, not the order the updates came in: a writer's
        writes by clock (writers by client id, as Yjs orders concurrent ones)."""
        items = sorted(self._items_of(name, wanted), key=lambda item: (item.client, item.clock))
        return [items[-1].value] if items else []

    def _items_of(self, name: str, wanted: Callable[[object], bool]) -> list[Item]:
        try:
            candidates = [item for item in self._new_items() if wanted(item.value)]
            return [item for item in candidates if self._place(item) == (FIELDS_ROOT, name)]
        except _UNREADABLE:
            return []  # the gate passed these bytes; if this reader cannot, rules see none

    def _mention(self, words: Iterable[str]) -> bool:
        needles = [word.encode() for word in words]
        return any(needle in update for needle in needles for update in self._updates)

    def _new_items(self) -> list[Item]:
        if self._items is None:
            self._items = [
                item
                for update in self._updates
                for item in read_items(update)
                if item.value is not NOT_SCALAR and self._integrated_now(item)
            ]
        return self._items

    def _integrated_now(self, item: Item) -> bool:
        return self._before.get(item.client, 0) <= item.clock < self._after.get(item.client, 0)

    def _place(self, item: Item) -> tuple[str, str | None] | None:
        if item.parent_root is not None:
            return item.parent_root, item.key
        if item.parent_item is not None:
            return None
        if self._places is None:
            self._places = self._doc_places().of(self._doc)
        return self._places.place((item.client, item.clock))
