"""The Thrift compact protocol, schema-less, for Parquet's footers and page headers.

A decoded :class:`Struct` keeps, for every field, its header bytes and its value's bytes as read, so
re-encoding gives the input byte for byte, fields unknown to any schema included (generated Thrift
code drops fields newer than its schema). Fields can be replaced (:meth:`Struct.set`,
:meth:`Struct.set_raw`): re-encoding then writes the changed fields anew and copies the rest.
"""

from __future__ import annotations

import struct as _struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# Compact protocol type ids.
BOOL_TRUE, BOOL_FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(1, 13)
_INTS = (I16, I32, I64)


class ThriftError(ValueError):
    """The bytes are not a well-formed Thrift compact value."""


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        if n < 0x80:
            out.append(n)
            return bytes(out)
        out.append((n & 0x7F) | 0x80)
        n >>= 7


def zigzag(n: int, bits: int = 64) -> int:
    return (n << 1) ^ (n >> (bits - 1))


def padded_varint(n: int, size: int) -> bytes | None:
    """``n`` as a varint of exactly ``size`` bytes (non-minimal: continuation bits over zero groups), or
    None when it needs more."""
    minimal = varint(n)
    if len(minimal) > size:
        return None
    if len(minimal) == size:
        return minimal
    out = bytearray(minimal)
    out[-1] |= 0x80
    out += b"\x80" * (size - len(minimal) - 1) + b"\x00"
    return bytes(out)


@dataclass(repr=False, slots=True)
class Field:
    """One field of a struct: ``header`` and ``raw`` (the value's bytes) as read, or None once replaced."""

    id: int
    type: int
    value: Any
    header: bytes | None
    raw: bytes | None
    #: The previous field's id when read: the header bytes are reused only while it is unchanged.
    prev: int = 0

    def __repr__(self) -> str:  # no value: it may be key metadata or a decrypted header
        return f"Field({self.id}, type {self.type})"


@dataclass(repr=False)
class ThriftList:
    """A list or set: its element type and items; ``raw`` is its whole encoding as read."""

    element: int
    items: list[Any]
    raw: bytes | None = None

    def __repr__(self) -> str:
        return f"ThriftList(type {self.element}, {len(self.items)} items)"

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


_LAZY = object()  # a nested value not decoded yet (see ``decode_struct(lazy=True)``)
_NESTED = (LIST, SET, MAP, STRUCT)


class Struct:
    """A decoded struct: fields by id, in the order read. Read as a ``{field id: value}`` dict is (``get``, ``in``,
    ``[]``, ``len``, iteration, ``items``), lists as lists, values decoded as they are asked for."""

    __slots__ = ("fields", "raw", "_changed")

    def __init__(self, fields: dict[int, Field], raw: bytes | None) -> None:
        self.fields = fields
        self.raw = raw
        self._changed = False

    def __contains__(self, fid: int) -> bool:
        return fid in self.fields

    def get(self, fid: int, default: Any = None) -> Any:
        f = self.fields.get(fid)
        return default if f is None else _materialized(f)

    def __getitem__(self, fid: int) -> Any:
        return _materialized(self.fields[fid])

    def __iter__(self) -> Iterator[int]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def items(self) -> Iterator[tuple[int, Any]]:
        return ((fid, _materialized(f)) for fid, f in self.fields.items())

    def __repr__(self) -> str:  # field ids and types only: values may be key metadata or plaintext
        return f"Struct({', '.join(f'{f.id}:{f.type}' for f in self.fields.values())})"

    def set(self, fid: int, value: Any, ftype: int) -> None:
        """Give field ``fid`` ``value`` of compact type ``ftype`` (added after the others if absent)."""
        if ftype in (BOOL_TRUE, BOOL_FALSE):
            ftype = BOOL_TRUE if value else BOOL_FALSE
        self._put(fid, ftype, value, None)

    def set_raw(self, fid: int, ftype: int, raw: bytes) -> None:
        """Give field ``fid`` the already encoded value ``raw`` (e.g. a non-minimal varint), decoded if asked for."""
        self._put(fid, ftype, _LAZY, raw)

    def _put(self, fid: int, ftype: int, value: Any, raw: bytes | None) -> None:
        old = self.fields.get(fid)
        header = old.header if old is not None and old.type == ftype else None
        self.fields[fid] = Field(fid, ftype, value, header, raw, old.prev if old is not None else -1)
        self._changed = True

    def delete(self, fid: int) -> None:
        if self.fields.pop(fid, None) is not None:
            self._changed = True

    def changed(self) -> bool:
        if self._changed or self.raw is None:
            return True
        return any(f.raw is None or _value_changed(f.type, f.value) for f in self.fields.values())

    def encode(self) -> bytes:
        out = self._reencoded()
        return self.raw if out is None else out

    def _reencoded(self) -> bytes | None:
        """The struct encoded anew, or None where its bytes as read stand (nothing in it changed); each nested
        value is looked at once."""
        changed = self._changed or self.raw is None
        values: list[bytes | None] = []
        for f in self.fields.values():
            if f.type in (BOOL_TRUE, BOOL_FALSE):
                values.append(None)
                changed = changed or f.raw is None
            elif f.raw is None:
                values.append(_encode_value(f.type, f.value))
                changed = True
            else:
                new = _reencoded_value(f.type, f.value)
                values.append(f.raw if new is None else new)
                changed = changed or new is not None
        if not changed:
            return None
        out = bytearray()
        prev = 0
        for f, value in zip(self.fields.values(), values, strict=True):
            if f.header is not None and f.prev == prev:
                out += f.header
            else:
                delta = f.id - prev
                out += bytes([(delta << 4) | f.type]) if 0 < delta <= 15 else \
                    bytes([f.type]) + varint(zigzag(f.id, 16))
            if value is not None:
                out += value
            prev = f.id
        out.append(0)
        return bytes(out)

    def to_dict(self) -> dict[int, Any]:
        """The struct as plain Python values: structs as ``{field id: value}``, lists as lists."""
        return {fid: _plain(_materialized(f)) for fid, f in self.fields.items()}


def _materialized(f: Field) -> Any:
    if f.value is _LAZY:  # decoded as lazily as it was skipped: its own nested values when asked for
        f.value = Reader(f.raw)._value(f.type, lazy=True)
    return f.value


def _plain(value: Any) -> Any:
    if isinstance(value, Struct):
        return value.to_dict()
    if isinstance(value, ThriftList):
        return [_plain(v) for v in value.items]
    if isinstance(value, list):  # a map: (key, value) pairs
        return {_plain(k): _plain(v) for k, v in value}
    return value


def _value_changed(ftype: int, value: Any) -> bool:
    if value is _LAZY:
        return False
    if ftype == STRUCT:
        return value.changed()
    if ftype in (LIST, SET):
        return value.raw is None or (value.element in (STRUCT, LIST, SET, MAP)
                                     and any(_value_changed(value.element, v) for v in value.items))
    return False


def _reencoded_value(ftype: int, value: Any) -> bytes | None:
    """``value`` (of a field read as it is) encoded anew, or None where its bytes as read stand."""
    if value is _LAZY:
        return None
    if ftype == STRUCT:
        return value._reencoded()
    if ftype not in (LIST, SET):
        return None
    if value.raw is None:
        return _encode_value(ftype, value)
    element = value.element
    if element not in _NESTED:
        return None
    items = [_reencoded_value(element, item) for item in value.items]
    if all(item is None for item in items):
        return None
    n = len(items)
    out = bytearray([(n << 4) | element] if n < 15 else [0xF0 | element])
    if n >= 15:
        out += varint(n)
    for new, item in zip(items, value.items, strict=True):
        out += new if new is not None else item.raw if element == STRUCT else _encode_element(element, item)
    return bytes(out)


def _encode_element(ftype: int, value: Any) -> bytes:
    if ftype in (BOOL_TRUE, BOOL_FALSE):
        return b"\x01" if value else b"\x02"
    return _encode_value(ftype, value)


def _encode_value(ftype: int, value: Any) -> bytes:
    if ftype == BYTE:
        return _struct.pack("b", value)
    if ftype in _INTS:
        return varint(zigzag(value, 64))
    if ftype == DOUBLE:
        return _struct.pack("<d", value)
    if ftype == BINARY:
        return varint(len(value)) + bytes(value)
    if ftype in (LIST, SET):
        if not _value_changed(ftype, value):
            return value.raw
        n = len(value.items)
        out = bytearray([(n << 4) | value.element] if n < 15 else [0xF0 | value.element])
        if n >= 15:
            out += varint(n)
        for item in value.items:
            out += _encode_element(value.element, item)
        return bytes(out)
    if ftype == STRUCT:
        return value.encode()
    raise ThriftError(f"cannot encode Thrift type {ftype}")


class Reader:
    """Decodes compact-protocol values from ``data`` starting at ``pos``."""

    def __init__(self, data: bytes | memoryview, pos: int = 0) -> None:
        # bytes index and slice faster than a memoryview
        self.data, self.pos = data if isinstance(data, bytes) else bytes(data), pos

    def _byte(self) -> int:
        if self.pos >= len(self.data):
            raise ThriftError("input ends inside a Thrift value")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self._byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 70:
                raise ThriftError("malformed Thrift varint")

    def _zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def _bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ThriftError("input ends inside a Thrift binary value")
        self.pos += n
        return bytes(self.data[self.pos - n : self.pos])

    def struct(self, lazy: bool = False, eager: int = 0) -> Struct:
        """The struct at the current position; ``lazy``: its nested values (structs, lists, maps) decoded only when
        asked for, but for the structs (in fields or lists) of the ``eager`` levels below it."""
        # Hot: every page header and footer goes through here, so field headers and integers are read inline
        # (the same bytes accepted and refused as by ``_byte`` and ``varint``).
        data = self.data
        n = len(data)
        start = pos = self.pos
        fields: dict[int, Field] = {}
        last = 0
        while True:
            if pos >= n:
                self.pos = pos
                raise ThriftError("input ends inside a Thrift value")
            hstart = pos
            header = data[pos]
            pos += 1
            if header == 0:
                self.pos = pos
                return Struct(fields, data[start:pos])
            kind, delta = header & 0x0F, header >> 4
            if delta:
                fid = last + delta
            else:
                self.pos = pos
                fid = self._zigzag()
                pos = self.pos
            vstart = pos
            if kind in _INTS:
                shift = result = 0
                while True:
                    if pos >= n:
                        self.pos = pos
                        raise ThriftError("input ends inside a Thrift value")
                    b = data[pos]
                    pos += 1
                    result |= (b & 0x7F) << shift
                    if not b & 0x80:
                        break
                    shift += 7
                    if shift > 70:
                        self.pos = pos
                        raise ThriftError("malformed Thrift varint")
                value = (result >> 1) ^ -(result & 1)
            elif kind == BINARY:
                shift = size = 0
                while True:
                    if pos >= n:
                        self.pos = pos
                        raise ThriftError("input ends inside a Thrift value")
                    b = data[pos]
                    pos += 1
                    size |= (b & 0x7F) << shift
                    if not b & 0x80:
                        break
                    shift += 7
                    if shift > 70:
                        self.pos = pos
                        raise ThriftError("malformed Thrift varint")
                if pos + size > n:
                    self.pos = pos
                    raise ThriftError("input ends inside a Thrift binary value")
                value = data[pos : pos + size]
                pos += size
            elif kind == BOOL_TRUE or kind == BOOL_FALSE:
                value = kind == BOOL_TRUE
            elif kind == STRUCT and (eager or not lazy):
                self.pos = pos
                value = self.struct(lazy, max(eager - 1, 0))
                pos = self.pos
            else:
                self.pos = pos
                if lazy and not eager and kind in _NESTED:
                    self.pos = skip(data, pos, kind)
                    value = _LAZY
                else:
                    value = self._value(kind, lazy, max(eager - 1, 0))
                pos = self.pos
            fields[fid] = Field(fid, kind, value, data[hstart:vstart], data[vstart:pos], last)
            last = fid

    def _value(self, kind: int, lazy: bool = False, eager: int = 0) -> Any:
        """The value of ``kind`` at the current position (``lazy``, ``eager``: as :meth:`struct` decodes a struct, the
        structs of a list as structs of the same level)."""
        if kind in (BOOL_TRUE, BOOL_FALSE):
            return kind == BOOL_TRUE
        if kind == BYTE:
            return _struct.unpack("b", self._bytes(1))[0]
        if kind in _INTS:
            return self._zigzag()
        if kind == DOUBLE:
            return _struct.unpack("<d", self._bytes(8))[0]
        if kind == BINARY:
            return self._bytes(self.varint())
        if kind in (LIST, SET):
            start = self.pos
            header = self._byte()
            size, element = header >> 4, header & 0x0F
            if size == 15:
                size = self.varint()
            if element == STRUCT:
                items = [self.struct(lazy, eager) for _ in range(size)]
            else:
                items = [self._element(element) for _ in range(size)]
            return ThriftList(element, items, bytes(self.data[start : self.pos]))
        if kind == MAP:
            size = self.varint()
            if not size:
                return []
            types = self._byte()
            return [(self._element(types >> 4), self._element(types & 0x0F)) for _ in range(size)]
        if kind == STRUCT:
            return self.struct(lazy, eager)
        raise ThriftError(f"unknown Thrift type {kind}")

    def _element(self, kind: int) -> Any:
        return self._byte() == 1 if kind in (BOOL_TRUE, BOOL_FALSE) else self._value(kind)


def _past_varint(data: bytes, pos: int, n: int) -> int:
    """The position after the varint at ``pos`` (refused as :meth:`Reader.varint` refuses it)."""
    for end in range(pos, min(pos + 11, n)):
        if not data[end] & 0x80:
            return end + 1
    raise ThriftError("malformed Thrift varint" if pos + 11 <= n else "input ends inside a Thrift value")


def _varint_at(data: bytes, pos: int, n: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it (refused as :meth:`Reader.varint` refuses it)."""
    value = 0
    for shift in range(0, 77, 7):
        if pos >= n:
            raise ThriftError("input ends inside a Thrift value")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
    raise ThriftError("malformed Thrift varint")


def _past_binary(data: bytes, pos: int, n: int) -> int:
    size, pos = _varint_at(data, pos, n)
    pos += size
    if pos > n:
        raise ThriftError("input ends inside a Thrift binary value")
    return pos


def skip(data: bytes, pos: int, kind: int) -> int:
    """The position after the value of ``kind`` at ``data[pos:]``, building nothing; the same bytes accepted and
    refused as by :meth:`Reader._value`."""
    # Hot: a lazily decoded footer or page header skips most of its bytes, so the common cases are inline.
    n = len(data)
    if kind == STRUCT:
        while True:
            if pos >= n:
                raise ThriftError("input ends inside a Thrift value")
            header = data[pos]
            pos += 1
            if not header:
                return pos
            if not header & 0xF0:
                pos = _past_varint(data, pos, n)
            kind = header & 0x0F
            # a one-byte varint (most integers and lengths here) read inline, the rest by the helpers
            if kind in _INTS:
                if pos < n and data[pos] < 0x80:
                    pos += 1
                else:
                    pos = _past_varint(data, pos, n)
            elif kind == BINARY:
                if pos < n and data[pos] < 0x80:
                    pos += 1 + data[pos]
                    if pos > n:
                        raise ThriftError("input ends inside a Thrift binary value")
                else:
                    pos = _past_binary(data, pos, n)
            elif kind != BOOL_TRUE and kind != BOOL_FALSE:
                pos = skip(data, pos, kind)
    if kind == BOOL_TRUE or kind == BOOL_FALSE:
        return pos
    if kind in _INTS:
        return _past_varint(data, pos, n)
    if kind == BINARY:
        return _past_binary(data, pos, n)
    if kind == BYTE or kind == DOUBLE:
        pos += 1 if kind == BYTE else 8
        if pos > n:
            raise ThriftError("input ends inside a Thrift binary value")
        return pos
    if kind == LIST or kind == SET:
        if pos >= n:
            raise ThriftError("input ends inside a Thrift value")
        header = data[pos]
        count, element = header >> 4, header & 0x0F
        pos += 1
        if count == 15:
            count, pos = _varint_at(data, pos, n)
        if element == BOOL_TRUE or element == BOOL_FALSE:
            pos += count
            if pos > n:
                raise ThriftError("input ends inside a Thrift value")
        elif element in _INTS:
            for _ in range(count):
                pos = _past_varint(data, pos, n)
        elif element == BINARY:
            for _ in range(count):
                pos = _past_binary(data, pos, n)
        else:
            for _ in range(count):
                pos = skip(data, pos, element)
        return pos
    if kind == MAP:
        size, pos = _varint_at(data, pos, n)
        if not size:
            return pos
        if pos >= n:
            raise ThriftError("input ends inside a Thrift value")
        types = data[pos]
        pos += 1
        for _ in range(size):
            for element in (types >> 4, types & 0x0F):
                if element == BOOL_TRUE or element == BOOL_FALSE:
                    pos += 1
                    if pos > n:
                        raise ThriftError("input ends inside a Thrift value")
                else:
                    pos = skip(data, pos, element)
        return pos
    raise ThriftError(f"unknown Thrift type {kind}")


#: What :func:`page_header` gives: ``type``, ``compressed_page_size`` and ``crc`` (None where absent), where the crc's
#: varint starts in the header and its size (-1 where absent), and where the header ends.
PageHeaderFacts = tuple[int | None, int | None, int | None, int, int, int]


def page_header(data: bytes) -> PageHeaderFacts:
    """The fields of the Parquet PageHeader at the start of ``data`` that a module-level re-encryption reads, without
    building a :class:`Struct` (the fast path of ``decode_struct(data, lazy=True)``: pages outnumber every other
    module): ``type`` (field 1), ``compressed_page_size`` (3) and ``crc`` (4), the crc varint's place (its bytes are
    what a new CRC is patched over, the rest of the header staying as it is), and the end of the header.

    Refuses what ``decode_struct(data, lazy=True)`` refuses, and besides a field given twice and a field 1, 3 or 4
    that is not an integer."""
    n = len(data)
    pos = last = 0
    page_type = size = crc = None
    crc_at = crc_size = -1
    seen: set[int] = set()
    while True:
        if pos >= n:
            raise ThriftError("input ends inside a Thrift value")
        header = data[pos]
        pos += 1
        if not header:
            return page_type, size, crc, crc_at, crc_size, pos
        kind = header & 0x0F
        if header & 0xF0:
            fid = last + (header >> 4)
        else:
            reader = Reader(data, pos)
            fid = reader._zigzag()
            pos = reader.pos
        if fid in seen:
            raise ThriftError(f"page header field {fid} given twice")
        seen.add(fid)
        last = fid
        if kind in _INTS:
            start = pos
            result, pos = _varint_at(data, pos, n)  # a call per field: a header has a few, a file a few hundred
            if fid == 1:
                page_type = (result >> 1) ^ -(result & 1)
            elif fid == 3:
                size = (result >> 1) ^ -(result & 1)
            elif fid == 4:
                crc = (result >> 1) ^ -(result & 1)
                crc_at, crc_size = start, pos - start
        elif fid in (1, 3, 4):
            raise ThriftError(f"page header field {fid} is not an integer")
        elif kind == BINARY:
            pos = _past_binary(data, pos, n)
        elif kind != BOOL_TRUE and kind != BOOL_FALSE:
            pos = skip(data, pos, kind)


def decode_struct(data: bytes | memoryview, pos: int = 0, lazy: bool = False, eager: int = 0
                  ) -> tuple[Struct, int]:
    """The struct encoded at ``data[pos:]`` and the position after it; ``lazy``: its nested values decoded only
    when asked for (a column's statistics, say, are then only skipped), but for the structs of the first ``eager``
    levels below it (a footer's row groups and column chunks, say, while their column metadata waits)."""
    reader = Reader(data, pos)
    return reader.struct(lazy, eager), reader.pos
