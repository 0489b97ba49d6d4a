"""The Thrift compact protocol, schema-less, for Parquet's footers and page headers.

A decoded :class:`Struct` keeps, for every field, its header bytes and its value's bytes as read, so
re-encoding gives the input byte for byte, fields unknown to any schema included (generated Thrift
code drops fields newer than its schema). Fields can be replaced (:meth:`Struct.set`,
:meth:`Struct.set_raw`): re-encoding then writes the changed fields anew and copies the rest.
"""

from __future__ import annotations

import struct as _struct
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


_LAZY = object()  # a nested value not decoded yet (see ``decode_struct(lazy=True)``)
_NESTED = (LIST, SET, MAP, STRUCT)


class Struct:
    """A decoded struct: fields by id, in the order read."""

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
    if f.value is _LAZY:
        f.value = Reader(f.raw)._value(f.type)
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

    def struct(self, lazy: bool = False) -> Struct:
        """The struct at the current position; ``lazy``: its nested values (structs, lists, maps) decoded only when
        asked for."""
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
            elif kind == STRUCT and not lazy:
                self.pos = pos
                value = self.struct()
                pos = self.pos
            else:
                self.pos = pos
                if lazy and kind in _NESTED:
                    self._skip(kind)
                    value = _LAZY
                else:
                    value = self._value(kind)
                pos = self.pos
            fields[fid] = Field(fid, kind, value, data[hstart:vstart], data[vstart:pos], last)
            last = fid

    def _value(self, kind: int) -> Any:
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
                items = [self.struct() for _ in range(size)]
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
            return self.struct()
        raise ThriftError(f"unknown Thrift type {kind}")

    def _element(self, kind: int) -> Any:
        return self._byte() == 1 if kind in (BOOL_TRUE, BOOL_FALSE) else self._value(kind)

    def _skip(self, kind: int) -> None:
        """Past the value of ``kind`` at the current position, building nothing."""
        if kind in (BOOL_TRUE, BOOL_FALSE):
            return
        if kind == BYTE:
            self._bytes(1)
        elif kind in _INTS:
            self.varint()
        elif kind == DOUBLE:
            self._bytes(8)
        elif kind == BINARY:
            self._bytes(self.varint())
        elif kind in (LIST, SET):
            header = self._byte()
            size, element = header >> 4, header & 0x0F
            for _ in range(self.varint() if size == 15 else size):
                self._skip_element(element)
        elif kind == MAP:
            size = self.varint()
            if size:
                types = self._byte()
                for _ in range(size):
                    self._skip_element(types >> 4)
                    self._skip_element(types & 0x0F)
        elif kind == STRUCT:
            while header := self._byte():
                if not header >> 4:
                    self.varint()
                self._skip(header & 0x0F)
        else:
            raise ThriftError(f"unknown Thrift type {kind}")

    def _skip_element(self, kind: int) -> None:
        if kind in (BOOL_TRUE, BOOL_FALSE):
            self._byte()
        else:
            self._skip(kind)


def decode_struct(data: bytes | memoryview, pos: int = 0, lazy: bool = False) -> tuple[Struct, int]:
    """The struct encoded at ``data[pos:]`` and the position after it; ``lazy``: its nested values decoded only
    when asked for (a page header's statistics, say, are then only skipped)."""
    reader = Reader(data, pos)
    return reader.struct(lazy), reader.pos
