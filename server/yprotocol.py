"""y-protocols framing: varUint message types and varByteArray payloads (lib0 encoding)."""

from __future__ import annotations

SYNC, AWARENESS, AUTH, QUERY_AWARENESS = 0, 1, 2, 3
STEP1, STEP2, UPDATE = 0, 1, 2


class BadMessage(Exception):
    """A frame that is not a well-formed y-protocols message."""


def write_var_uint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)


def message(*parts: int | bytes) -> bytes:
    """varUint for ints, varByteArray for bytes."""
    out = bytearray()
    for part in parts:
        if isinstance(part, bytes):
            write_var_uint(out, len(part))
            out += part
        else:
            write_var_uint(out, part)
    return bytes(out)


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def var_uint(self) -> int:
        value, shift = 0, 0
        while True:
            if self.pos >= len(self.data) or shift > 49:
                raise BadMessage("bad varUint")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    def var_bytes(self) -> bytes:
        n = self.var_uint()
        if n > len(self.data) - self.pos:
            raise BadMessage("length past the end")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def done(self) -> None:
        if self.pos != len(self.data):
            raise BadMessage("trailing bytes")
