"""Tests for crdt_models.yupdate, the structural gate in front of pycrdt.

* every file of tests/corpus/hostile/ is rejected fast, with little memory;
* every update and state vector pycrdt (yrs) writes is accepted, and the shape
  agrees with the documents' state vectors (hypothesis);
* byte mutations of real updates only ever raise MalformedUpdate, and what the
  gate lets through does not kill the process when pycrdt applies it.
"""

from __future__ import annotations

import random
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pycrdt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text, XmlElement, XmlFragment, XmlText

from crdt_models.yupdate import (
    Limits,
    MalformedUpdate,
    UpdateShape,
    encode_state_vector,
    inspect_state_vector,
    inspect_update,
)

CORPUS = Path(__file__).parent / "corpus" / "hostile"
MAX_SAFE = (1 << 53) - 1


def vu(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def vs(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return vu(len(b)) + b


def one_client(
    structs: bytes, n: int = 1, client: int = 7, clock: int = 0, ds: bytes = b"\x00"
) -> bytes:
    return b"\x01" + vu(n) + vu(client) + vu(clock) + structs + ds


def any_item(values: bytes, n: int = 1) -> bytes:
    """A ContentAny struct under root map "fields", key "k"."""
    return b"\x28\x01" + vs("fields") + vs("k") + vu(n) + values


def gc(length: int) -> bytes:
    return b"\x00" + vu(length)


def skip(length: int) -> bytes:
    return b"\x0a" + vu(length)


def record_update() -> bytes:
    """A 12-field activity record, all fields written in one transaction."""
    doc: Doc[Any] = Doc(client_id=1234567890)
    fields: Map[Any] = Map()
    doc["fields"] = fields
    with doc.transaction():
        fields.update(
            {
                "jobdesc": "Replace filter",
                "plandatetime": "2024-05-01T08:00:00Z",
                "expirydatetime": "2024-05-01T18:00:00Z",
                "gracetime": 15,
                "priority": "HIGH",
                "jobstatus": "ASSIGNED",
                "assignee": "user-4711",
                "starttime": "2024-05-01T08:05:00Z",
                "endtime": None,
                "lat": 12.971599,
                "lon": 77.594566,
                "remarks": "Ladder",
            }
        )
    return doc.get_update()


# ---------------------------------------------------------------------------
# hostile corpus


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if p.suffix in (".bin", ".sv"))


def test_corpus_is_present_and_documented() -> None:
    files = corpus_files()
    assert len(files) >= 40
    readme = (CORPUS / "README.md").read_text()
    for path in files:
        assert f"`{path.name}`" in readme, f"{path.name} is not described in README.md"
    assert len((CORPUS / "panic-zero-length-gc-28b.bin").read_bytes()) == 28


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_hostile_input_is_rejected_fast_and_small(path: Path) -> None:
    data = path.read_bytes()
    parse: Callable[[bytes], object] = (
        inspect_state_vector if path.suffix == ".sv" else inspect_update
    )
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        with pytest.raises(MalformedUpdate) as info:
            parse(data)
        best = min(best, time.perf_counter() - start)
    assert best < 0.010, f"{path.name} took {best * 1000:.2f} ms"
    assert "byte" in str(info.value)

    tracemalloc.start()
    try:
        with pytest.raises(MalformedUpdate):
            parse(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{path.name} peaked at {peak} bytes"


def test_malformed_update_is_a_value_error() -> None:
    err = MalformedUpdate("bad thing at byte 3")
    assert isinstance(err, ValueError)
    assert str(err) == "bad thing at byte 3"


# ---------------------------------------------------------------------------
# focused accept / reject cases


def test_empty_update_and_state_vector() -> None:
    shape = inspect_update(b"\x00\x00")
    assert shape.is_empty()
    assert shape == UpdateShape(clients={}, struct_count=0, delete_ranges=0, has_nested_types=False)
    assert shape.adds_beyond({}) == []
    assert inspect_state_vector(b"\x00") == {}
    assert encode_state_vector({}) == b"\x00"
    for bad in (b"", b"\x00", b"\x00\x00\x00"):
        with pytest.raises(MalformedUpdate):
            inspect_update(bad)
    for bad in (b"", b"\x00\x00"):
        with pytest.raises(MalformedUpdate):
            inspect_state_vector(bad)


def test_delete_only_update() -> None:
    shape = inspect_update(b"\x00\x02\x07\x02\x00\x01\x05\x02\x09\x01\x03\x04")
    assert shape.clients == {}
    assert shape.delete_ranges == 3
    assert not shape.is_empty()
    assert shape.adds_beyond({}) == []


def test_delete_set_client_with_no_ranges_is_accepted() -> None:
    # Yjs' readDeleteSet tolerates it and yrs' merge_updates passes it through.
    shape = inspect_update(b"\x00\x01\x07\x00")
    assert shape.delete_ranges == 0 and shape.is_empty()


LIB0 = Limits(max_clock=1 << 53)  # lib0's own range instead of what yrs handles
YRS_MAX = (1 << 31) - 1


def test_varuint_boundaries() -> None:
    # the largest client id and clock lib0 can carry (53 bits) is fine ...
    ok = b"\x00\x01" + vu(MAX_SAFE) + b"\x01" + vu(MAX_SAFE - 1) + b"\x01"
    assert inspect_update(ok, LIB0).delete_ranges == 1
    sv = b"\x01" + vu(MAX_SAFE) + vu(MAX_SAFE)
    assert inspect_state_vector(sv, LIB0) == {MAX_SAFE: MAX_SAFE}
    # ... one more is not
    with pytest.raises(MalformedUpdate, match="53 bits"):
        inspect_state_vector(b"\x01" + vu(MAX_SAFE + 1) + b"\x00", LIB0)
    # a range ending exactly at 2**53 is fine, one past is not
    assert inspect_update(b"\x00\x01\x07\x01" + vu(MAX_SAFE) + b"\x01", LIB0).delete_ranges == 1
    with pytest.raises(MalformedUpdate, match="past the limit"):
        inspect_update(b"\x00\x01\x07\x01" + vu(MAX_SAFE) + b"\x02", LIB0)
    # non-canonical but short varUints are read like lib0 reads them
    assert inspect_state_vector(b"\x01\x87\x00\x05") == {7: 5}


def test_gc_and_skip_ranges() -> None:
    shape = inspect_update(one_client(gc(3) + skip(2) + gc(1) + skip(4), n=4, clock=10))
    assert shape.clients == {7: (10, 16)}  # trailing Skip not included
    assert shape.struct_count == 4
    shape = inspect_update(one_client(skip(5) + gc(1), n=2))
    assert shape.clients == {7: (5, 6)}  # leading Skip not included
    shape = inspect_update(one_client(skip(5)))
    assert shape.clients == {} and shape.struct_count == 1 and shape.is_empty()


def test_adds_beyond() -> None:
    update = b"\x02" + b"\x01\x09\x03" + gc(2) + b"\x01\x07\x00" + gc(4) + b"\x00"
    shape = inspect_update(update)
    assert dict(shape.clients) == {9: (3, 5), 7: (0, 4)}
    assert shape.adds_beyond({}) == [7, 9]
    assert shape.adds_beyond({7: 4, 9: 4}) == [9]
    assert shape.adds_beyond({7: 3, 9: 5}) == [7]
    assert shape.adds_beyond({7: 100, 9: 5}) == []


def test_string_length_counts_utf16_units() -> None:
    item = b"\x04\x01" + vs("t") + vs("a😀é中")  # 1 + 2 + 1 + 1 UTF-16 units
    assert inspect_update(one_client(item)).clients == {7: (0, 5)}


def test_any_depth_limit() -> None:
    def nested(depth: int) -> bytes:
        return one_client(any_item(b"\x75\x01" * depth + b"\x7e"))

    inspect_update(nested(16))
    with pytest.raises(MalformedUpdate, match="deeper than 16"):
        inspect_update(nested(17))
    inspect_update(nested(3), Limits(max_any_depth=3))
    with pytest.raises(MalformedUpdate, match="deeper than 2"):
        inspect_update(nested(3), Limits(max_any_depth=2))
    # siblings do not add up: a wide, shallow value is fine
    wide = b"\x75\x10" + b"\x75\x01\x7e" * 16
    inspect_update(one_client(any_item(wide)))
    # objects and arrays mix; every any type is understood
    scalars = [
        b"\x7f", b"\x7e", b"\x7d\x85\x01", b"\x7d\xc5\x01", b"\x7c\x00\x00\x80\x3f",
        b"\x7b" + bytes(8), b"\x7a" + bytes(8), b"\x79", b"\x78",
        b"\x77" + vs("é"), b"\x74" + vs(b"\x00\xff"),
    ]  # fmt: skip
    obj = b"\x76" + vu(len(scalars)) + b"".join(vs(f"k{i}") + v for i, v in enumerate(scalars))
    value = b"\x75\x02" + obj + b"\x75\x00"
    assert inspect_update(one_client(any_item(value + obj, n=2))).clients == {7: (0, 2)}


def test_limits() -> None:
    three_gcs = one_client(gc(1) + gc(1) + gc(1), n=3)
    inspect_update(three_gcs, Limits(max_structs=3))
    with pytest.raises(MalformedUpdate, match="more than 2 structs"):
        inspect_update(three_gcs, Limits(max_structs=2))
    with pytest.raises(MalformedUpdate, match="exceeds the limit"):
        inspect_update(three_gcs, Limits(max_bytes=len(three_gcs) - 1))
    ds = b"\x00\x01\x07\x03\x00\x01\x05\x01\x09\x01"
    inspect_update(ds, Limits(max_delete_ranges=3))
    with pytest.raises(MalformedUpdate, match="more than 2 ranges"):
        inspect_update(ds, Limits(max_delete_ranges=2))
    # distinct clients are counted over both sections together
    two = b"\x01\x01\x07\x00" + gc(1) + b"\x01\x09\x01\x00\x01"
    inspect_update(two, Limits(max_clients=2))
    with pytest.raises(MalformedUpdate, match="more than 1 distinct"):
        inspect_update(two, Limits(max_clients=1))
    same = b"\x01\x01\x07\x00" + gc(1) + b"\x01\x07\x01\x00\x01"
    inspect_update(same, Limits(max_clients=1))
    sv = encode_state_vector({1: 1, 2: 2, 3: 3})
    assert inspect_state_vector(sv, Limits(max_clients=3)) == {1: 1, 2: 2, 3: 3}
    with pytest.raises(MalformedUpdate, match="limit is 2"):
        inspect_state_vector(sv, Limits(max_clients=2))
    with pytest.raises(MalformedUpdate, match="exceeds the limit"):
        inspect_state_vector(sv, Limits(max_bytes=3))


def test_clock_may_reach_but_not_pass_2_pow_53_under_lib0_limits() -> None:
    update = one_client(b"\x04\x01" + vs("t") + vs("x"), clock=2**53 - 1)
    assert inspect_update(update, LIB0).clients == {7: (2**53 - 1, 2**53)}
    with pytest.raises(MalformedUpdate, match="past the limit"):
        inspect_update(one_client(b"\x04\x01" + vs("t") + vs("xy"), clock=2**53 - 1), LIB0)


def test_clocks_stay_in_yrs_range_by_default() -> None:
    """yrs truncates clocks and lengths to u32 (GC(len 2**32) == GC(len 0)) and
    mis-integrates clocks above 2**31, so the default limit is 2**31 - 1."""
    root_item = b"\x04\x01" + vs("t") + vs("x")
    assert inspect_update(one_client(root_item, clock=YRS_MAX - 1)).clients == {
        7: (YRS_MAX - 1, YRS_MAX)
    }
    assert inspect_update(one_client(gc(YRS_MAX))).clients == {7: (0, YRS_MAX)}
    refused = {
        "struct end": one_client(root_item, clock=YRS_MAX),
        "GC length": one_client(gc(1 << 32)),
        "start clock": one_client(root_item, clock=(1 << 31) + 1),
        "origin": one_client(b"\x84\x07" + vu(1 << 31) + vs("x")),
        "right origin": one_client(b"\x44\x07" + vu(1 << 31) + vs("x")),
        "parent": one_client(b"\x04\x00\x07" + vu(1 << 31) + vs("x")),
        "delete range": b"\x00\x01\x07\x01" + vu(YRS_MAX) + b"\x01",
    }
    for what, update in refused.items():
        with pytest.raises(MalformedUpdate, match="past the limit"):
            inspect_update(update)
        assert inspect_update(update, LIB0), what  # fine for lib0
    assert inspect_update(b"\x00\x01\x07\x01" + vu(YRS_MAX - 1) + b"\x01").delete_ranges == 1
    assert inspect_state_vector(b"\x01\x07" + vu(YRS_MAX)) == {7: YRS_MAX}
    with pytest.raises(MalformedUpdate, match="past the limit"):
        inspect_state_vector(b"\x01\x07" + vu(1 << 31))


def test_bytes_like_input() -> None:
    update = record_update()
    expected = inspect_update(update)
    assert inspect_update(bytearray(update)) == expected  # type: ignore[arg-type]
    assert inspect_update(memoryview(update)) == expected  # type: ignore[arg-type]
    assert inspect_state_vector(bytearray(b"\x01\x07\x05")) == {7: 5}  # type: ignore[arg-type]


def test_encode_state_vector() -> None:
    assert encode_state_vector({7: 5}) == b"\x01\x07\x05"
    assert (
        encode_state_vector({1: 2, 300: 1 << 40}) == b"\x02" + vu(300) + vu(1 << 40) + b"\x01\x02"
    )
    state = {MAX_SAFE: 0, 0: MAX_SAFE, 5: 128}
    assert inspect_state_vector(encode_state_vector(state), LIB0) == state
    for bad in ({-1: 0}, {0: -1}, {MAX_SAFE + 1: 0}, {0: MAX_SAFE + 1}):
        with pytest.raises(ValueError):
            encode_state_vector(bad)
    # pycrdt reads what we write
    doc: Doc[Any] = Doc(client_id=11)
    fields: Map[Any] = Map()
    doc["fields"] = fields
    fields["a"] = 1
    assert pycrdt.get_state(doc.get_update()) == encode_state_vector({11: 1})


def test_every_content_kind_pycrdt_writes() -> None:
    """ContentAny (all any types), Binary-in-any, Type (Map/Array/Text/Xml*),
    String, Format, Embed, Deleted, Doc (subdocument), GC and delete sets."""
    doc: Doc[Any] = Doc(client_id=4242)
    seen: list[bytes] = []
    doc.observe(lambda event: seen.append(event.update))
    fields: Map[Any] = Map()
    doc["fields"] = fields
    fields["dict"] = {"a": [1, {"b": None}], "c": "x", "d": True, "e": 1.5}
    fields["bytes"] = b"\x00\x01"
    fields["nested"] = Map({"inner": Array([1, "two", Text("three")])})
    doc["body"] = body = Text()
    body.insert(0, "hello", {"bold": True})
    body.insert_embed(2, {"image": "x.png"})
    body.insert(len(body), " wörld 😀")
    del body[1:3]
    doc["xml"] = xml = XmlFragment()
    xml.children.append(XmlElement("p", {"class": "c"}, [XmlText("hi")]))
    fields["sub"] = Doc()
    fields["nested"] = 5  # the nested map and its children are garbage collected
    for update in seen + [doc.get_update()]:
        inspect_update(update)
    full = inspect_update(doc.get_update())
    assert full.has_nested_types
    assert dict(full.clients) == {4242: (0, inspect_state_vector(doc.get_state())[4242])}
    assert full.delete_ranges >= 1


def test_merge_of_non_contiguous_updates_has_skip_structs() -> None:
    doc: Doc[Any] = Doc(client_id=77)
    log: list[bytes] = []
    doc.observe(lambda event: log.append(event.update))
    fields: Map[Any] = Map()
    doc["fields"] = fields
    for value in ("a", "b", "c", "d"):
        fields["k"] = value
    merged = pycrdt.merge_updates(log[0], log[2])
    assert b"\x0a\x01" in merged  # Skip, length 1
    shape = inspect_update(merged)
    assert shape.clients == {77: (0, 3)}
    assert shape.struct_count == 3  # item, Skip, item
    assert shape.adds_beyond({77: 2}) == [77]
    assert shape.adds_beyond({77: 3}) == []


def test_pycrdt_mid_character_text_edit_is_refused() -> None:
    """pycrdt's Text indexes are UTF-8 byte offsets.  An offset inside a
    multi-byte character makes yrs write a zero-length ContentString (and the
    update is corrupt: the inserted "x" references itself as right origin and
    never integrates elsewhere).  Applying such zero-length structs to a doc
    that already holds that clock panics yrs, so the gate refuses them."""
    doc: Doc[Any] = Doc(client_id=8)
    doc["body"] = body = Text()
    body += "é"
    body.insert(1, "x")  # byte 1 is inside "é"
    with pytest.raises(MalformedUpdate, match="zero-length"):
        inspect_update(doc.get_update())
    # inserting at a character boundary (byte 2) is clean
    doc = Doc(client_id=8)
    doc["body"] = body = Text()
    body += "é"
    body.insert(2, "x")
    assert inspect_update(doc.get_update()).clients == {8: (0, 2)}


def test_record_parse_is_cheap() -> None:
    update = record_update()
    inspect_update(update)
    rounds = 200
    start = time.perf_counter()
    for _ in range(rounds):
        inspect_update(update)
    per_parse = (time.perf_counter() - start) / rounds
    assert per_parse < 300e-6, f"{per_parse * 1e6:.1f} us per parse of {len(update)} bytes"


# ---------------------------------------------------------------------------
# acceptance: everything pycrdt writes passes, and the shape is right

CLIENT_IDS = (1, 300, MAX_SAFE)
KEYS = ("status", "level", "ü", "😀", "remarks")
TEXT_ALPHABET = st.sampled_from(list("ab Z") + ["é", "ß", "中", "😀", "🇫🇷"[0]])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=6),
)
any_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=4), inner, max_size=3),
    ),
    max_leaves=8,
)


def new_doc(client_id: int) -> Doc[Any]:
    doc: Doc[Any] = Doc(client_id=client_id)
    doc["fields"] = Map()
    doc["items"] = Array()
    doc["body"] = Text()
    return doc


def state_of(doc: Doc[Any]) -> dict[int, int]:
    raw = doc.get_state()
    state = inspect_state_vector(raw)
    assert inspect_state_vector(encode_state_vector(state)) == state
    assert inspect_state_vector(pycrdt.get_state(doc.get_update())) == state
    return state


def byte_offset(text: str, index: int) -> int:
    return len(text[:index].encode())


def check_full_update(doc: Doc[Any]) -> None:
    shape = inspect_update(doc.get_update())
    state = state_of(doc)
    assert {c: end for c, (_, end) in shape.clients.items()} == state
    assert all(first == 0 for first, _ in shape.clients.values())


def merged_range(shapes: list[UpdateShape]) -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    for shape in shapes:
        for client, (first, end) in shape.clients.items():
            if client in out:
                f0, e0 = out[client]
                out[client] = (min(f0, first), max(e0, end))
            else:
                out[client] = (first, end)
    return out


def do_local_op(doc: Doc[Any], data: st.DataObject) -> None:
    fields = doc.get("fields", type=Map)
    items = doc.get("items", type=Array)
    body = doc.get("body", type=Text)
    kind = data.draw(
        st.sampled_from(
            [
                "set",
                "set",
                "set_nested",
                "edit_nested",
                "del",
                "arr_ins",
                "arr_del",
                "txt_ins",
                "txt_del",
            ]
        )
    )
    if kind == "set":
        fields[data.draw(st.sampled_from(KEYS))] = data.draw(any_values)
    elif kind == "set_nested":
        key = data.draw(st.sampled_from(KEYS))
        if data.draw(st.booleans()):
            fields[key] = Map({"x": data.draw(scalars), "y": data.draw(any_values)})
        else:
            fields[key] = Array(data.draw(st.lists(scalars, min_size=1, max_size=3)))
    elif kind == "edit_nested":
        nested = [fields[k] for k in sorted(fields.keys()) if isinstance(fields[k], (Map, Array))]
        if nested:
            target = data.draw(st.sampled_from(nested))
            if isinstance(target, Map):
                target[data.draw(st.sampled_from(["x", "z"]))] = data.draw(scalars)
            else:
                target.append(data.draw(scalars))
    elif kind == "del":
        key = data.draw(st.sampled_from(KEYS))
        if key in fields:
            del fields[key]
    elif kind == "arr_ins":
        index = data.draw(st.integers(0, len(items)))
        values = data.draw(st.lists(any_values, min_size=1, max_size=3))
        with doc.transaction():
            for offset, value in enumerate(values):
                items.insert(index + offset, value)
    elif kind == "arr_del":
        if len(items):
            start = data.draw(st.integers(0, len(items) - 1))
            stop = data.draw(st.integers(start + 1, len(items)))
            del items[start:stop]
    elif kind == "txt_ins":
        text = str(body)
        index = data.draw(st.integers(0, len(text)))
        body.insert(
            byte_offset(text, index),
            data.draw(st.text(TEXT_ALPHABET, min_size=1, max_size=5)),
        )
    else:  # txt_del
        text = str(body)
        if text:
            start = data.draw(st.integers(0, len(text) - 1))
            stop = data.draw(st.integers(start + 1, len(text)))
            del body[byte_offset(text, start) : byte_offset(text, stop)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_everything_pycrdt_writes_is_accepted(data: st.DataObject) -> None:
    docs = [new_doc(c) for c in CLIENT_IDS]
    logs: list[list[bytes]] = [[] for _ in docs]
    subs = [
        doc.observe(lambda event, log=log: log.append(event.update)) for doc, log in zip(docs, logs)
    ]

    for _ in range(data.draw(st.integers(1, 30))):
        i = data.draw(st.integers(0, len(docs) - 1))
        doc, log = docs[i], logs[i]
        before = state_of(doc)
        seen = len(log)
        if data.draw(st.integers(0, 4)) == 0:  # sync from another doc
            source = docs[data.draw(st.integers(0, len(docs) - 1))]
            diff = source.get_update(doc.get_state())
            diff_shape = inspect_update(diff)
            source_state = state_of(source)
            for client, (first, end) in diff_shape.clients.items():
                assert end == source_state[client]
                assert first == before.get(client, 0)
            doc.apply_update(diff)
            writers: set[int] = set(source_state)
        else:
            do_local_op(doc, data)
            writers = {doc.client_id}
        after = state_of(doc)
        grew = sorted(c for c, clock in after.items() if clock > before.get(c, 0))
        assert set(grew) <= writers
        new = log[seen:]
        assert len(new) <= 1
        if new:
            assert inspect_update(new[0]).adds_beyond(before) == grew
        else:
            assert grew == []

    for doc, log in zip(docs, logs):
        check_full_update(doc)
        for update in log:
            inspect_update(update)
        for other in docs:
            inspect_update(doc.get_update(other.get_state()))
        if len(log) >= 2:
            # non-contiguous subsets make merge_updates write Skip structs
            picks = data.draw(
                st.lists(st.integers(0, len(log) - 1), min_size=2, max_size=5, unique=True)
            )
            parts = [log[k] for k in sorted(picks)]
            merged = inspect_update(pycrdt.merge_updates(*parts))
            assert dict(merged.clients) == merged_range([inspect_update(p) for p in parts])
            inspect_update(pycrdt.merge_updates(*log[::2]))
    everything = [u for log in logs for u in log]
    if everything:
        inspect_update(pycrdt.merge_updates(*everything))
    for doc, sub in zip(docs, subs):
        doc.unobserve(sub)


# ---------------------------------------------------------------------------
# mutation fuzzing


def valid_updates() -> list[bytes]:
    rng = random.Random(1)
    out: list[bytes] = [record_update(), b"\x00\x00"]
    docs = [new_doc(c) for c in CLIENT_IDS]
    logs: list[list[bytes]] = [[] for _ in docs]
    subs = [
        doc.observe(lambda event, log=log: log.append(event.update)) for doc, log in zip(docs, logs)
    ]
    for step in range(60):
        doc = docs[step % 3]
        fields, items, body = (
            doc.get("fields", type=Map),
            doc.get("items", type=Array),
            doc.get("body", type=Text),
        )
        choice = rng.randrange(7)
        if choice == 0:
            fields[rng.choice(KEYS)] = rng.choice(
                [None, True, 3, -7, 2.5, "välue", b"\x01", [1, {"a": "b"}]]
            )
        elif choice == 1:
            fields[rng.choice(KEYS)] = Map({"x": rng.random(), "t": Text("hé")})
        elif choice == 2:
            items.insert(rng.randint(0, len(items)), rng.choice(["x", 1, None, {"k": [1.5]}]))
        elif choice == 3 and len(items):
            del items[rng.randrange(len(items))]
        elif choice == 4:
            text = str(body)
            body.insert(
                byte_offset(text, rng.randint(0, len(text))),
                rng.choice(["ab", "é", "😀x", "中"]),
            )
        elif choice == 5 and str(body):
            text = str(body)
            start = rng.randrange(len(text))
            del body[byte_offset(text, start) : byte_offset(text, start + 1)]
        else:
            other = docs[rng.randrange(3)]
            doc.apply_update(other.get_update(doc.get_state()))
    for doc, log in zip(docs, logs):
        out.append(doc.get_update())
        out.extend(log[::7])
        out.append(pycrdt.merge_updates(*log[::3]))
        doc.unobserve(subs[docs.index(doc)])
    return out


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(8)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            pos = min(pos, len(buf) - 1)
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # set a byte to an interesting value
            pos = min(pos, len(buf) - 1)
            buf[pos] = rng.choice(
                (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x75, 0x76, rng.randrange(256))
            )
        elif op == 2:  # truncate
            del buf[pos:]
        elif op == 3:  # insert bytes
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
        elif op == 4 and buf:  # delete bytes
            del buf[pos : pos + rng.randint(1, 3)]
        elif op == 5 and buf:  # duplicate a slice
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start : start + rng.randint(1, 8)]
        elif op == 6 and buf:  # replace the varUint at pos with another value
            pos = min(pos, len(buf) - 1)
            end = pos
            while end < len(buf) - 1 and buf[end] & 0x80:
                end += 1
            value = rng.choice(
                (0, 1, rng.randrange(1 << 14), rng.randrange(1 << 32), (1 << 31) + 1, 1 << 32)
            )
            buf[pos : end + 1] = vu(value)
        else:  # append
            buf += bytes([rng.randrange(256)])
    return bytes(buf)


def fuzz(seed: int, rounds: int) -> dict[str, int]:
    rng = random.Random(seed)
    corpus = valid_updates()
    for update in corpus:
        inspect_update(update)
    counts = {
        "mutants": 0,
        "rejected": 0,
        "accepted": 0,
        "applied": 0,
        "pycrdt_error": 0,
        "pycrdt_panic": 0,
    }
    for _ in range(rounds):
        mutant = mutate(rng, rng.choice(corpus))
        counts["mutants"] += 1
        try:
            inspect_update(mutant)
        except MalformedUpdate:
            counts["rejected"] += 1
            continue
        counts["accepted"] += 1
        doc: Doc[Any] = Doc()
        try:
            doc.apply_update(mutant)
            doc.get_update()
            counts["applied"] += 1
        except Exception:  # noqa: BLE001 - counting what pycrdt refuses
            counts["pycrdt_error"] += 1
        except BaseException:  # noqa: BLE001 - pyo3 PanicException is a BaseException
            counts["pycrdt_panic"] += 1
    return counts


def test_mutated_updates_only_raise_malformed_update() -> None:
    counts = fuzz(seed=20240501, rounds=10_000)
    print("mutation fuzz:", counts)
    assert counts["rejected"] + counts["accepted"] == counts["mutants"]
    assert counts["rejected"] > counts["mutants"] // 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_only_raise_malformed_update(data: bytes) -> None:
    for parse in (inspect_update, inspect_state_vector):
        try:
            parse(data)
        except MalformedUpdate:
            pass


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.integers(0, MAX_SAFE), st.integers(0, YRS_MAX), max_size=20),
    st.data(),
)
def test_state_vector_mutations(state: dict[int, int], data: st.DataObject) -> None:
    encoded = encode_state_vector(state)
    assert inspect_state_vector(encoded) == state
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    mutant = mutate(rng, encoded)
    try:
        parsed = inspect_state_vector(mutant)
    except MalformedUpdate:
        return
    assert encode_state_vector(parsed) == encode_state_vector(dict(parsed))
    Doc().get_update(mutant)  # whatever the gate accepts, yrs decodes
