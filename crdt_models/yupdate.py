"""Strict structural pre-check ("update gate") for untrusted Yjs v1 updates.

Why this module exists
----------------------
pycrdt hands update bytes to the Rust ``yrs`` library, which is not a safe
parser of hostile input (measured with pycrdt 0.14.13 / yrs 0.28; every case is
in ``tests/corpus/hostile/``, whose README says what each does unguarded):

* a 28-byte update holding zero-length GC structs makes ``apply_update`` panic
  (divide by zero); the panic is a ``BaseException`` and leaves the doc broken;
  other zero-length structs, and a client entry with no structs, panic it too
  when the doc already holds that client's clock;
* yrs keeps clocks and lengths as u32 and silently truncates larger values, so
  a GC struct of length 2**32 is the same zero-length GC (and the same panic);
  and clocks above 2**31 break its integration (items skip the pending queue,
  index-out-of-bounds panics);
* ``ff ff ff 7a`` as an update allocates ~540 MB before failing;
* ``ff ff ff ff 01`` as a state vector allocates ~1 GB;
* a 60 KB update of lib0 ``any`` arrays nested 30,000 deep segfaults the
  process inside ``apply_update`` (20,000 deep applies, and reading the value
  segfaults).

The server therefore runs :func:`inspect_update` / :func:`inspect_state_vector`
on every untrusted update or state vector *before* pycrdt sees it.  The parser
walks the whole v1 encoding (the layout of Yjs ``UpdateEncoderV1``:
``writeClientsStructs``, ``Item.write``, the ``Content*.write`` methods,
``writeDeleteSet`` and lib0 ``writeAny``) without building any objects, so it
runs in time linear in the input and allocates almost nothing:

* every varUint is capped at 53 bits (as lib0 does) and 8 bytes;
* every declared count or byte length is checked against the bytes that remain
  *before* anything loops over it, and against :class:`Limits`;
* lib0 ``any`` values are walked iteratively with a depth limit;
* anything no Yjs implementation writes is refused: zero-length structs and
  delete ranges, unknown content refs / type refs / any tags, struct info bits
  that GC/Skip never carry, invalid UTF-8, a client listed twice in one
  section, and bytes after the delete set;
* clocks (struct and delete-range ends, ID clocks, state-vector entries) stay
  within :attr:`Limits.max_clock`: 2**31 - 1 by default (what yrs handles),
  where lib0 alone would allow 2**53.

Passing the gate does not mean yrs will integrate the update (it may still be
missing causal dependencies or reference structs that do not exist); it means
the bytes are well-formed and bounded, so the remaining failures are ordinary
errors that the caller contains.

Format notes verified against bytes written by pycrdt 0.14.13 (yrs) and the Yjs
sources: origin is info bit 0x80, right origin 0x40, parentSub 0x20; parent
info (and parentSub) is written only when both origins are absent; the parent
info flag is a varUint 1 (root type name follows) or 0 (parent ID follows); a
ContentString's struct length counts UTF-16 code units; GC and Skip structs
carry a varUint length; delete-set lengths are plain varUints in v1.

One deliberate refusal of something a real implementation writes: pycrdt's
``Text`` indexes are UTF-8 byte offsets, and an edit at an offset inside a
multi-byte character makes yrs write zero-length ContentString /
ContentDeleted structs (the update is corrupt anyway: the inserted text names
itself as its right origin).  Such structs can panic yrs, so they are refused.
A delete-set client with zero ranges, which Yjs reads and yrs' merge passes
through, is accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "Limits",
    "OWN_DOC_LIMITS",
    "MalformedUpdate",
    "UpdateShape",
    "encode_state_vector",
    "inspect_state_vector",
    "inspect_update",
]

_MAX_SAFE = (1 << 53) - 1
"""Largest varUint lib0 accepts (``Number.MAX_SAFE_INTEGER``)."""
_YRS_MAX_CLOCK = (1 << 31) - 1
"""Largest clock yrs (under pycrdt) handles correctly.  It keeps clocks and
lengths as u32 and silently truncates larger values (a GC struct of length
2**32 becomes a zero-length GC and the divide-by-zero panic; an item at clock
2**32 lands on clock 0), and above 2**31 its clock arithmetic goes wrong: an
item at clock 2**31 + 1 of an unknown client is integrated instead of parked as
pending, and such updates panic it with an index out of bounds."""


class MalformedUpdate(ValueError):
    """Bytes that are not a well-formed Yjs v1 update / state vector."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource caps applied while parsing one untrusted input."""

    max_bytes: int = 1 << 20
    max_clients: int = 1000
    """Distinct client ids in one update (struct and delete sections together)
    or one state vector."""
    max_structs: int = 100_000
    """Structs in one update, counting GC and Skip structs."""
    max_any_depth: int = 16
    """Nesting of lib0 ``any`` containers (objects/arrays) in ContentAny values
    and ContentDoc options; a top-level array or object has depth 1."""
    max_delete_ranges: int = 100_000
    max_clock: int = _YRS_MAX_CLOCK
    """Largest clock a struct or delete range may end at (exclusive end), and
    largest clock an ID (origin, right origin, parent) or state-vector entry
    may name.  lib0 allows up to 2**53; the default, 2**31 - 1, is what yrs
    handles correctly (see ``_YRS_MAX_CLOCK``).  Set ``1 << 53`` to check
    against lib0 alone."""


_DEFAULT_LIMITS = Limits()

OWN_DOC_LIMITS = Limits(max_bytes=1 << 24, max_clients=1 << 20)
"""For state vectors the server reads from its own docs (not untrusted input): a record
edited by more than 1000 devices over its life is normal, not an attack."""


@dataclass(frozen=True, slots=True)
class UpdateShape:
    """What a well-formed update contains, as far as the server cares.

    ``clients`` maps a client id to ``(first clock, end clock)`` (end
    exclusive) of the structs the update carries for that client.  Skip
    structs (the gaps ``merge_updates`` leaves between non-contiguous parts)
    advance the clock but carry nothing: leading and trailing Skips are not
    part of the range, and a client that has only Skip structs is not listed.
    """

    clients: Mapping[int, tuple[int, int]]
    struct_count: int
    """Every struct in the update, GC and Skip structs included."""
    delete_ranges: int
    """Number of ``(client, clock, len)`` ranges in the delete set."""
    has_nested_types: bool
    """Whether any ContentType struct (a nested shared type) is present."""

    def adds_beyond(self, state: Mapping[int, int]) -> list[int]:
        """Client ids (ascending) for which this update carries structs the
        holder of the state vector ``state`` lacks (end clock > its clock)."""
        get = state.get
        return sorted(c for c, (_, end) in self.clients.items() if end > get(c, 0))

    def is_empty(self) -> bool:
        """True when the update carries no structs (other than Skip
        placeholders) and no deletions, e.g. ``b"\\x00\\x00"``."""
        return not self.clients and self.delete_ranges == 0


# ---------------------------------------------------------------------------
# low-level readers
#
# The hot path reads a varUint as
#     v = data[pos]; pos += 1
#     if v >= 0x80: v, pos = _varuint_tail(data, pos, v)
# so the common one-byte case costs no function call.  Reading past the end
# of ``data`` raises IndexError, which the public functions turn into
# MalformedUpdate; byte *lengths* are checked explicitly, because slicing
# past the end would not raise.


def _varuint_tail(data: bytes, pos: int, first: int) -> tuple[int, int]:
    """Finish a varUint whose first byte ``first`` (at ``pos - 1``) had the
    continuation bit set.  Returns ``(value, new_pos)``."""
    start = pos - 1
    value = first & 0x7F
    shift = 7
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift >= 56:
            raise MalformedUpdate(
                f"varUint at byte {start} runs past 8 bytes (lib0 caps at 53 bits)"
            )
    if value > _MAX_SAFE:
        raise MalformedUpdate(f"varUint at byte {start} exceeds 53 bits")
    return value, pos


def _varint_skip(data: bytes, pos: int) -> int:
    """Skip a lib0 signed varInt (6 data bits + sign in the first byte) at
    ``pos``; enforce lib0's 53-bit magnitude cap."""
    start = pos
    b = data[pos]
    pos += 1
    if b < 0x80:
        return pos
    value = b & 0x3F
    shift = 6
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift >= 55:
            raise MalformedUpdate(
                f"varInt at byte {start} runs past 8 bytes (lib0 caps at 53 bits)"
            )
    if value > _MAX_SAFE:
        raise MalformedUpdate(f"varInt at byte {start} exceeds 53 bits")
    return pos


def _utf8_check(data: bytes, start: int, end: int, what: str) -> None:
    """Validate ``data[start:end]`` (already bounds-checked) as UTF-8."""
    chunk = data[start:end]
    if not chunk.isascii():
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedUpdate(f"invalid UTF-8 in {what} at byte {start + exc.start}") from None


def _clock_error(what: str, pos: int, clock: int, max_clock: int) -> MalformedUpdate:
    return MalformedUpdate(f"{what} clock {clock} at byte {pos} is past the limit {max_clock}")


def _overrun(what: str, pos: int, n: int, size: int) -> MalformedUpdate:
    return MalformedUpdate(f"{what} at byte {pos} declares {n} bytes but only {size - pos} remain")


def _skip_string(data: bytes, pos: int, size: int, what: str) -> int:
    """Skip a varString (varUint byte length + UTF-8) at ``pos``."""
    n = data[pos]
    pos += 1
    if n >= 0x80:
        n, pos = _varuint_tail(data, pos, n)
    end = pos + n
    if end > size:
        raise _overrun(what, pos, n, size)
    if n:
        _utf8_check(data, pos, end, what)
    return end


def _string_units(data: bytes, pos: int, size: int) -> tuple[int, int]:
    """Read a ContentString varString; return ``(utf16_length, new_pos)``."""
    n = data[pos]
    pos += 1
    if n >= 0x80:
        n, pos = _varuint_tail(data, pos, n)
    end = pos + n
    if end > size:
        raise _overrun("string", pos, n, size)
    chunk = data[pos:end]
    if chunk.isascii():
        return n, end
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedUpdate(
            f"invalid UTF-8 in string content at byte {pos + exc.start}"
        ) from None
    # UTF-16 code units: one per code point, two for those beyond the BMP.
    return len(text.encode("utf-16-le")) >> 1, end


def _skip_bytes(data: bytes, pos: int, size: int, what: str) -> int:
    """Skip a varUint8Array (varUint length + raw bytes) at ``pos``."""
    n = data[pos]
    pos += 1
    if n >= 0x80:
        n, pos = _varuint_tail(data, pos, n)
    end = pos + n
    if end > size:
        raise _overrun(what, pos, n, size)
    return end


# lib0 `any` type tags (written as 127 - index of the reader in lib0's table).
_ANY_UNDEFINED = 127
_ANY_NULL = 126
_ANY_VARINT = 125
_ANY_FLOAT32 = 124
_ANY_FLOAT64 = 123
_ANY_BIGINT64 = 122
_ANY_FALSE = 121
_ANY_TRUE = 120
_ANY_STRING = 119
_ANY_OBJECT = 118
_ANY_ARRAY = 117
_ANY_BYTES = 116
_ANY_NO_PAYLOAD = frozenset((_ANY_UNDEFINED, _ANY_NULL, _ANY_FALSE, _ANY_TRUE))
_ANY_8_BYTES = frozenset((_ANY_FLOAT64, _ANY_BIGINT64))
_ANY_CONTAINERS = frozenset((_ANY_OBJECT, _ANY_ARRAY))


def _skip_any(data: bytes, pos: int, size: int, max_depth: int) -> int:
    """Skip one lib0 ``any`` value at ``pos`` without recursion.

    Open containers are kept on an explicit stack of ``(values still to read,
    container is an object)``; its height is the nesting depth.
    """
    remaining = 1
    in_object = False
    stack: list[tuple[int, bool]] = []
    while True:
        if remaining == 0:
            if not stack:
                return pos
            remaining, in_object = stack.pop()
            continue
        remaining -= 1
        if in_object:
            pos = _skip_string(data, pos, size, "any object key")
        tag = data[pos]
        pos += 1
        if tag == _ANY_STRING:
            pos = _skip_string(data, pos, size, "any string")
        elif tag == _ANY_FLOAT32:
            pos += 4
        elif tag == _ANY_VARINT:
            pos = _varint_skip(data, pos)
        elif tag in _ANY_8_BYTES:
            pos += 8
        elif tag in _ANY_NO_PAYLOAD:
            pass
        elif tag in _ANY_CONTAINERS:
            n = data[pos]
            pos += 1
            if n >= 0x80:
                n, pos = _varuint_tail(data, pos, n)
            is_obj = tag == _ANY_OBJECT
            # every entry needs at least one byte (two for a key + value)
            if (n * 2 if is_obj else n) > size - pos:
                kind = "object" if is_obj else "array"
                raise MalformedUpdate(
                    f"any {kind} at byte {pos} declares {n} entries "
                    f"but only {size - pos} bytes remain"
                )
            stack.append((remaining, in_object))
            if len(stack) > max_depth:
                raise MalformedUpdate(
                    f"any value at byte {pos} nests deeper than {max_depth} levels"
                )
            remaining = n
            in_object = is_obj
        elif tag == _ANY_BYTES:
            pos = _skip_bytes(data, pos, size, "any Uint8Array")
        else:
            raise MalformedUpdate(f"unknown lib0 any type {tag} at byte {pos - 1}")
        if pos > size:  # a fixed-width number ran past the end
            raise MalformedUpdate(f"any number runs past the end of the input (byte {size})")


# ContentType type refs (Yjs typeRefs table): YArray, YMap, YText,
# YXmlElement, YXmlFragment, YXmlHook, YXmlText.  3 and 5 carry a name.
_MAX_TYPE_REF = 6
_NAMED_TYPE_REFS = (3, 5)


def _as_bytes(data: bytes) -> bytes:
    if type(data) is bytes:
        return data
    return bytes(memoryview(data))


# ---------------------------------------------------------------------------
# public API


def inspect_update(data: bytes, limits: Limits = _DEFAULT_LIMITS) -> UpdateShape:
    """Parse a Yjs v1 update strictly and return its :class:`UpdateShape`.

    Raises :class:`MalformedUpdate` (a ``ValueError``) for anything that is
    not a well-formed, bounded v1 update; never anything else for bytes input.
    """
    data = _as_bytes(data)
    size = len(data)
    if size == 0:
        raise MalformedUpdate("empty input at byte 0 (the empty update is b'\\x00\\x00')")
    if size > limits.max_bytes:
        raise MalformedUpdate(
            f"update of {size} bytes exceeds the limit of {limits.max_bytes} (at byte 0)"
        )
    try:
        return _parse_update(data, size, limits)
    except IndexError:
        raise MalformedUpdate(f"update truncated: unexpected end of input at byte {size}") from None


def _parse_update(data: bytes, size: int, limits: Limits) -> UpdateShape:
    vt = _varuint_tail
    max_structs = limits.max_structs
    max_depth = limits.max_any_depth
    max_clock = limits.max_clock
    skip_string = _skip_string
    skip_any = _skip_any
    no_payload = _ANY_NO_PAYLOAD

    clients: dict[int, tuple[int, int]] = {}
    seen: set[int] = set()
    struct_count = 0
    has_types = False

    pos = 0
    # --- structs -----------------------------------------------------------
    num_clients = data[pos]
    pos += 1
    if num_clients >= 0x80:
        num_clients, pos = vt(data, pos, num_clients)
    if num_clients > limits.max_clients:
        raise MalformedUpdate(
            f"update lists {num_clients} clients at byte 0, limit is {limits.max_clients}"
        )
    if num_clients * 4 > size - pos:  # numStructs, client, clock, >= 1 struct
        raise MalformedUpdate(
            f"update declares {num_clients} clients at byte 0; "
            f"they cannot fit in the {size - pos} bytes that remain"
        )
    for _ in range(num_clients):
        header = pos
        num_structs = data[pos]
        pos += 1
        if num_structs >= 0x80:
            num_structs, pos = vt(data, pos, num_structs)
        client = data[pos]
        pos += 1
        if client >= 0x80:
            client, pos = vt(data, pos, client)
        clock = data[pos]
        pos += 1
        if clock >= 0x80:
            clock, pos = vt(data, pos, clock)
        if num_structs == 0:
            raise MalformedUpdate(f"client {client} at byte {header} has no structs")
        if num_structs * 2 > size - pos:  # every struct is >= 2 bytes
            raise MalformedUpdate(
                f"client {client} at byte {header} declares {num_structs} structs; "
                f"they cannot fit in the {size - pos} bytes that remain"
            )
        struct_count += num_structs
        if struct_count > max_structs:
            raise MalformedUpdate(
                f"update holds more than {max_structs} structs (at byte {header})"
            )
        if client in seen:
            raise MalformedUpdate(
                f"client {client} appears twice in the struct section (byte {header})"
            )
        seen.add(client)

        first = -1  # start of the first non-Skip struct
        last_end = -1  # end of the last non-Skip struct
        for _ in range(num_structs):
            spos = pos
            info = data[pos]
            pos += 1
            ref = info & 0x1F
            if ref == 0 or ref == 10:  # GC / Skip: varUint(len)
                if info != ref:
                    raise MalformedUpdate(
                        f"{'GC' if ref == 0 else 'Skip'} struct at byte {spos} "
                        f"has info bits {info:#x}"
                    )
                length = data[pos]
                pos += 1
                if length >= 0x80:
                    length, pos = vt(data, pos, length)
                if length == 0:
                    raise MalformedUpdate(
                        f"zero-length {'GC' if ref == 0 else 'Skip'} struct at byte {spos}"
                    )
                if ref == 10:
                    clock += length
                    continue
            elif ref > 9:
                raise MalformedUpdate(f"unknown struct content ref {ref} at byte {spos}")
            else:
                # ---- Item ----
                if info & 0x80:  # origin: ID (client, clock)
                    b = data[pos]
                    pos += 1
                    if b >= 0x80:
                        b, pos = vt(data, pos, b)
                    b = data[pos]
                    pos += 1
                    if b >= 0x80:
                        b, pos = vt(data, pos, b)
                        if b > max_clock:
                            raise _clock_error("origin", spos, b, max_clock)
                if info & 0x40:  # right origin: ID (client, clock)
                    b = data[pos]
                    pos += 1
                    if b >= 0x80:
                        b, pos = vt(data, pos, b)
                    b = data[pos]
                    pos += 1
                    if b >= 0x80:
                        b, pos = vt(data, pos, b)
                        if b > max_clock:
                            raise _clock_error("right origin", spos, b, max_clock)
                if not info & 0xC0:  # no origins: parent info follows
                    flag = data[pos]
                    pos += 1
                    if flag == 1:  # root type name (inlined varString)
                        n = data[pos]
                        pos += 1
                        if n >= 0x80:
                            n, pos = vt(data, pos, n)
                        end = pos + n
                        if end > size:
                            raise _overrun("root type name", pos, n, size)
                        if not data[pos:end].isascii():
                            _utf8_check(data, pos, end, "root type name")
                        pos = end
                    elif flag == 0:  # parent: ID (client, clock)
                        b = data[pos]
                        pos += 1
                        if b >= 0x80:
                            b, pos = vt(data, pos, b)
                        b = data[pos]
                        pos += 1
                        if b >= 0x80:
                            b, pos = vt(data, pos, b)
                            if b > max_clock:
                                raise _clock_error("parent", spos, b, max_clock)
                    else:
                        raise MalformedUpdate(
                            f"parent info flag {flag} (not 0/1) at byte {pos - 1}"
                        )
                    if info & 0x20:  # parentSub: map key (inlined varString)
                        n = data[pos]
                        pos += 1
                        if n >= 0x80:
                            n, pos = vt(data, pos, n)
                        end = pos + n
                        if end > size:
                            raise _overrun("parentSub key", pos, n, size)
                        if not data[pos:end].isascii():
                            _utf8_check(data, pos, end, "parentSub key")
                        pos = end
                # ---- content ----
                if ref == 8:  # ContentAny: varUint(n), n x any
                    n = data[pos]
                    pos += 1
                    if n >= 0x80:
                        n, pos = vt(data, pos, n)
                    if n == 0:
                        raise MalformedUpdate(
                            f"ContentAny with no values (zero-length struct) at byte {spos}"
                        )
                    if n > size - pos:
                        raise MalformedUpdate(
                            f"ContentAny at byte {spos} declares {n} values "
                            f"but only {size - pos} bytes remain"
                        )
                    for _ in range(n):
                        # Scalars (the common case) inline; containers, varInts
                        # and byte arrays go through _skip_any.
                        tag = data[pos]
                        if tag == 119:  # string
                            k = data[pos + 1]
                            pos += 2
                            if k >= 0x80:
                                k, pos = vt(data, pos, k)
                            end = pos + k
                            if end > size:
                                raise _overrun("any string", pos, k, size)
                            if not data[pos:end].isascii():
                                _utf8_check(data, pos, end, "any string")
                            pos = end
                        elif tag == 124:  # float32
                            pos += 5
                        elif tag == 123 or tag == 122:  # float64, bigint64
                            pos += 9
                        elif tag in no_payload:  # undefined, null, false, true
                            pos += 1
                        else:
                            pos = skip_any(data, pos, size, max_depth)
                    if pos > size:
                        raise MalformedUpdate(
                            f"ContentAny at byte {spos} runs past the end of the input"
                        )
                    length = n
                elif ref == 4:  # ContentString
                    length, pos = _string_units(data, pos, size)
                    if length == 0:
                        raise MalformedUpdate(
                            f"empty ContentString (zero-length struct) at byte {spos}; "
                            "pycrdt writes these after a Text edit at a byte offset "
                            "inside a multi-byte character"
                        )
                elif ref == 1:  # ContentDeleted: varUint(len)
                    length = data[pos]
                    pos += 1
                    if length >= 0x80:
                        length, pos = vt(data, pos, length)
                    if length == 0:
                        raise MalformedUpdate(
                            f"zero-length ContentDeleted at byte {spos}; pycrdt writes "
                            "these after a Text edit at a byte offset inside a "
                            "multi-byte character"
                        )
                elif ref == 7:  # ContentType: typeRef [name]
                    type_ref = data[pos]
                    pos += 1
                    if type_ref > _MAX_TYPE_REF:
                        raise MalformedUpdate(f"unknown type ref {type_ref} at byte {pos - 1}")
                    if type_ref in _NAMED_TYPE_REFS:
                        pos = skip_string(data, pos, size, "XML node name")
                    has_types = True
                    length = 1
                elif ref == 2:  # ContentJSON: varUint(n), n x varString
                    n = data[pos]
                    pos += 1
                    if n >= 0x80:
                        n, pos = vt(data, pos, n)
                    if n == 0:
                        raise MalformedUpdate(
                            f"ContentJSON with no values (zero-length struct) at byte {spos}"
                        )
                    if n > size - pos:
                        raise MalformedUpdate(
                            f"ContentJSON at byte {spos} declares {n} values "
                            f"but only {size - pos} bytes remain"
                        )
                    for _ in range(n):
                        pos = skip_string(data, pos, size, "JSON value")
                    length = n
                elif ref == 3:  # ContentBinary
                    pos = _skip_bytes(data, pos, size, "binary content")
                    length = 1
                elif ref == 5:  # ContentEmbed: JSON text
                    pos = skip_string(data, pos, size, "embed")
                    length = 1
                elif ref == 6:  # ContentFormat: key, JSON value
                    pos = skip_string(data, pos, size, "format key")
                    pos = skip_string(data, pos, size, "format value")
                    length = 1
                else:  # 9 ContentDoc: guid, any opts
                    pos = skip_string(data, pos, size, "subdocument guid")
                    pos = skip_any(data, pos, size, max_depth)
                    length = 1
            # GC and Items
            if first < 0:
                first = clock
            clock += length
            last_end = clock
        if clock > max_clock:
            raise MalformedUpdate(
                f"client {client} at byte {header}: structs end at clock {clock}, "
                f"past the limit {max_clock}"
            )
        if first >= 0:
            clients[client] = (first, last_end)

    # --- delete set --------------------------------------------------------
    ds_start = pos
    num_ds = data[pos]
    pos += 1
    if num_ds >= 0x80:
        num_ds, pos = vt(data, pos, num_ds)
    if num_ds > limits.max_clients:
        raise MalformedUpdate(
            f"delete set at byte {ds_start} lists {num_ds} clients, limit is {limits.max_clients}"
        )
    if num_ds * 2 > size - pos:  # client, numRanges
        raise MalformedUpdate(
            f"delete set at byte {ds_start} declares {num_ds} clients; "
            f"they cannot fit in the {size - pos} bytes that remain"
        )
    ranges = 0
    max_ranges = limits.max_delete_ranges
    ds_seen: set[int] = set()
    for _ in range(num_ds):
        header = pos
        client = data[pos]
        pos += 1
        if client >= 0x80:
            client, pos = vt(data, pos, client)
        if client in ds_seen:
            raise MalformedUpdate(
                f"client {client} appears twice in the delete set (byte {header})"
            )
        ds_seen.add(client)
        n = data[pos]
        pos += 1
        if n >= 0x80:
            n, pos = vt(data, pos, n)
        if n * 2 > size - pos:  # clock, len
            raise MalformedUpdate(
                f"delete set client {client} at byte {header} declares {n} ranges; "
                f"they cannot fit in the {size - pos} bytes that remain"
            )
        ranges += n
        if ranges > max_ranges:
            raise MalformedUpdate(
                f"delete set holds more than {max_ranges} ranges (at byte {header})"
            )
        for _ in range(n):
            rpos = pos
            clock = data[pos]
            pos += 1
            if clock >= 0x80:
                clock, pos = vt(data, pos, clock)
            length = data[pos]
            pos += 1
            if length >= 0x80:
                length, pos = vt(data, pos, length)
            if length == 0:
                raise MalformedUpdate(f"zero-length delete range at byte {rpos}")
            if clock + length > max_clock:
                raise MalformedUpdate(
                    f"delete range at byte {rpos} ends at clock {clock + length}, "
                    f"past the limit {max_clock}"
                )
    if pos != size:
        raise MalformedUpdate(f"{size - pos} trailing bytes after the delete set at byte {pos}")
    if ds_seen and len(seen | ds_seen) > limits.max_clients:
        raise MalformedUpdate(
            f"update names more than {limits.max_clients} distinct clients "
            f"(delete set at byte {ds_start})"
        )
    return UpdateShape(
        clients=MappingProxyType(clients),
        struct_count=struct_count,
        delete_ranges=ranges,
        has_nested_types=has_types,
    )


def inspect_state_vector(data: bytes, limits: Limits = _DEFAULT_LIMITS) -> dict[int, int]:
    """Parse a Yjs state vector (``varUint(n)`` then ``n`` x ``(client,
    clock)``) strictly; return ``{client: clock}``."""
    data = _as_bytes(data)
    size = len(data)
    if size == 0:
        raise MalformedUpdate("empty input at byte 0 (the empty state vector is b'\\x00')")
    if size > limits.max_bytes:
        raise MalformedUpdate(
            f"state vector of {size} bytes exceeds the limit of {limits.max_bytes} (at byte 0)"
        )
    vt = _varuint_tail
    try:
        n = data[0]
        pos = 1
        if n >= 0x80:
            n, pos = vt(data, pos, n)
        if n * 2 > size - pos:
            raise MalformedUpdate(
                f"state vector declares {n} clients at byte 0; "
                f"they cannot fit in the {size - pos} bytes that remain"
            )
        if n > limits.max_clients:
            raise MalformedUpdate(
                f"state vector lists {n} clients at byte 0, limit is {limits.max_clients}"
            )
        state: dict[int, int] = {}
        for _ in range(n):
            entry = pos
            client = data[pos]
            pos += 1
            if client >= 0x80:
                client, pos = vt(data, pos, client)
            clock = data[pos]
            pos += 1
            if clock >= 0x80:
                clock, pos = vt(data, pos, clock)
                if clock > limits.max_clock:
                    raise _clock_error("state vector entry", entry, clock, limits.max_clock)
            if client in state:
                raise MalformedUpdate(
                    f"client {client} appears twice in the state vector (byte {entry})"
                )
            state[client] = clock
    except IndexError:
        raise MalformedUpdate(
            f"state vector truncated: unexpected end of input at byte {size}"
        ) from None
    if pos != size:
        raise MalformedUpdate(f"{size - pos} trailing bytes after the state vector at byte {pos}")
    return state


def _write_varuint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def encode_state_vector(state: Mapping[int, int]) -> bytes:
    """Encode ``{client: clock}`` as a Yjs state vector: ``varUint(n)`` then
    ``n`` x ``(varUint client, varUint clock)``.  Clients are written in
    descending order (Yjs does not prescribe one), so equal maps give equal
    bytes."""
    out = bytearray()
    _write_varuint(out, len(state))
    for client in sorted(state, reverse=True):
        clock = state[client]
        if not 0 <= client <= _MAX_SAFE or not 0 <= clock <= _MAX_SAFE:
            raise ValueError(f"state vector entry {client}: {clock} is outside 0..2**53-1")
        _write_varuint(out, client)
        _write_varuint(out, clock)
    return bytes(out)
