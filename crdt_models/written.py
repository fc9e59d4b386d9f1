"""The field values a merge wrote, including those a concurrent write hid.

Two phones that set one field offline each show their own value; when the server
merges them, Yjs keeps the value of the higher client id and deletes the other the
moment it arrives. For most fields that is the answer everyone expects. For a status
that only moves forward or an escalation level it is a lost edit: a COMPLETED hidden
behind a concurrent INPROGRESS moves the task back on the phone that completed it,
and an escalation hidden behind a lower level is never seen. Rules ask
:class:`WrittenValues` for such values (``rules_common.keep_hidden_advance``).

Reading them costs a parse of the merged updates; finding which field a write went
to can cost a parse of the whole doc. Both happen only when a rule asks, and the doc
only when a written value would matter (``wanted``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from crdt_models.record import FIELDS_ROOT, RecordDoc
from crdt_models.yitems import NOT_SCALAR, Item, ItemPlaces, read_items

_UNREADABLE = (IndexError, ValueError)


class WrittenValues:
    """The scalar values ``updates`` wrote to the ``fields`` map of ``doc`` in one merge.

    ``before``/``after`` are the doc's state vectors around the merge: only items the
    merge integrated count (a re-sent update writes nothing). A value the writer itself
    overwrote within the merged updates counts too: delivered one update at a time it
    would have been seen, and a step back from it refused.
    """

    def __init__(
        self,
        doc: RecordDoc,
        updates: Sequence[bytes],
        before: Mapping[int, int],
        after: Mapping[int, int],
    ) -> None:
        self._doc = doc
        self._updates = updates
        self._before = before
        self._after = after
        self._items: list[Item] | None = None
        self._places: ItemPlaces | None = None

    def for_field(self, name: str, wanted: Callable[[object], bool]) -> list[object]:
        """The values written to ``fields[name]`` that ``wanted`` accepts, in update order."""
        try:
            candidates = [item for item in self._new_items() if wanted(item.value)]
            return [item.value for item in candidates if self._place(item) == (FIELDS_ROOT, name)]
        except _UNREADABLE:
            return []  # the gate passed these bytes; if this reader cannot, rules see none

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
            self._places = ItemPlaces(self._doc.get_update())
        return self._places.place((item.client, item.clock))
