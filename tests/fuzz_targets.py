"""Fuzz targets for everything that parses untrusted bytes, shared by the bounded CI run
(tests/test_fuzz.py) and the long run (bench/fuzz.py).

Each target takes bytes and returns normally or raises only the error its parser
documents; anything else is a finding. Findings are kept in tests/corpus/fuzz/ and
replayed by every test run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import msgpack
from pycrdt import Doc, Map

from crdt_models.written import WrittenValues
from crdt_models.yupdate import MalformedUpdate, inspect_state_vector, inspect_update
from server.awareness import parse_awareness
from server.codec import decode_json, decode_msgpack
from server.cursor import decode_cursor
from server.errors import ApiError
from server.gate import DocFailed, apply_update, state_of
from server.sync_api import parse_items
from server.yprotocol import BadMessage, Reader

CORPUS = Path(__file__).parent / "corpus" / "fuzz"
Target = Callable[[bytes], None]


def push_body(data: bytes) -> None:
    """A push body in either encoding, decoded and parsed into items."""
    for decode, binary in ((decode_msgpack, True), (decode_json, False)):
        try:
            parse_items(decode(data), binary, 1000)
        except ApiError:
            pass


def socket_frame(data: bytes) -> None:
    """A device-socket frame: msgpack map with a type."""
    try:
        frame = decode_msgpack(data)
    except ApiError:
        return
    if isinstance(frame, dict) and frame.get("t") == "push":
        try:
            parse_items(frame, True, 1000)
        except ApiError:
            pass


def cursor(data: bytes) -> None:
    try:
        decode_cursor("t1", "activity", data.decode("latin-1"))
    except ApiError:
        pass


def yjs_message(data: bytes) -> None:
    """A y-websocket message: type, sync step and payload, or an awareness update."""
    try:
        reader = Reader(data)
        kind = reader.var_uint()
        if kind == 0:
            reader.var_uint()
            reader.var_bytes()
            reader.done()
        elif kind == 1:
            parse_awareness(reader.var_bytes())
    except BadMessage:
        pass


def _seed_doc() -> Doc:  # type: ignore[type-arg]
    doc: Doc = Doc(client_id=1)  # type: ignore[type-arg]
    doc.get("fields", type=Map).update({"jobdesc": "seed", "gracetime": 5})
    return doc


def update_gate(data: bytes) -> None:
    """The update gate, then a contained apply of whatever it lets through."""
    try:
        inspect_state_vector(data)
    except MalformedUpdate:
        pass
    try:
        inspect_update(data)
    except MalformedUpdate:
        return
    for doc in (Doc(), _seed_doc()):
        before = state_of(doc)
        try:
            apply_update(doc, data)
        except DocFailed:
            continue
        # what a merge's rules read from the same bytes (never raises: unreadable is none)
        written = WrittenValues(doc, [data], before, state_of(doc))
        for name in ("jobdesc", "gracetime", "jobstatus"):
            written.for_field(name, lambda value: True)


TARGETS: dict[str, Target] = {
    "push_body": push_body,
    "socket_frame": socket_frame,
    "cursor": cursor,
    "yjs_message": yjs_message,
    "update_gate": update_gate,
}


def seeds() -> dict[str, list[bytes]]:
    """Valid inputs per target, for mutation."""
    doc = _seed_doc()
    update = doc.get_update()
    item = {"record_id": "r1", "bu": "bu1", "update": update, "state_vector": doc.get_state()}
    frame = {"t": "push", "id": 1, "domain": "activity", "items": [item]}
    return {
        "push_body": [
            msgpack.packb({"items": [item]}),
            b'{"items": [{"record_id": "r1", "bu": "bu1", "update": "AAA="}]}',
        ],
        "socket_frame": [msgpack.packb(frame), msgpack.packb({"t": "ping"})],
        "cursor": [b"g6F2AaFzxAh6oFf_9EXxiKFjga5uLTVhOTlhOWVlMDcwMAE"],
        "yjs_message": [
            b"\x00\x00\x01\x00",
            b"\x00\x02" + bytes([len(update)]) + update,
            b'\x01\x0c\x01\x01\x01\x08{"a":1}',
        ],
        "update_gate": [update, doc.get_state()],
    }


def mutate(data: bytes, rng: random.Random, rounds: int = 3) -> bytes:
    """Flip, insert, delete, duplicate or truncate a few bytes."""
    out = bytearray(data)
    for _ in range(rng.randint(1, rounds)):
        op = rng.randrange(5)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif op == 1:
            out[pos:pos] = bytes([rng.choice((0, 0x7F, 0x80, 0xFF, rng.randrange(256)))])
        elif op == 2 and out:
            del out[min(pos, len(out) - 1)]
        elif op == 3 and out:
            chunk = out[pos : pos + rng.randint(1, 8)]
            out[pos:pos] = chunk
        else:
            del out[pos:]
    return bytes(out)


def corpus() -> list[tuple[str, Path]]:
    """(target, file) of every kept input; the hostile update corpus feeds the update gate."""
    kept = [(p.parent.name, p) for p in sorted(CORPUS.glob("*/*.bin"))]
    hostile = CORPUS.parent / "hostile"
    kept += [("update_gate", p) for p in sorted(hostile.glob("*")) if p.suffix in (".bin", ".sv")]
    return kept
