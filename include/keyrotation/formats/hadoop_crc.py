"""Hadoop's checksum side files: ``.X.crc`` beside a file ``X`` that Hadoop's ``ChecksumFileSystem`` (Spark's
``file://``) wrote.

The side file is ``b"crc\\0"``, the chunk size as a big-endian int (512 by default), then the CRC-32 (zlib's) of
each chunk of ``X``, big-endian. Hadoop checks it on every read: a side file left stale by a change to ``X``
makes Spark fail with a ``ChecksumException``. S3, GCS and HDFS keep no side files.
"""

from __future__ import annotations

import posixpath
import struct
import zlib
from collections.abc import Callable

import pyarrow.fs as pafs

MAGIC = b"crc\0"
DEFAULT_CHUNK = 512
SUFFIX = ".crc"


def side_file(path: str) -> str:
    """The side file Hadoop keeps for ``path``."""
    directory, name = posixpath.split(path)
    return posixpath.join(directory, f".{name}{SUFFIX}")


def side_file_name(name: str) -> str:
    return f".{name}{SUFFIX}"


def checksums(data: bytes, chunk: int = DEFAULT_CHUNK) -> bytes:
    """The side file of a file holding ``data``."""
    out = bytearray(MAGIC + struct.pack(">i", chunk))
    view = memoryview(data)
    for start in range(0, len(data), chunk):
        out += struct.pack(">I", zlib.crc32(view[start : start + chunk]))
    return bytes(out)


def chunk_size(side: bytes) -> int | None:
    """The chunk size a side file names; None if it is not a Hadoop checksum file."""
    if len(side) < 8 or side[:4] != MAGIC:
        return None
    (chunk,) = struct.unpack(">i", side[4:8])
    return chunk if chunk > 0 else None


def replace_file(filesystem: pafs.FileSystem, staged: str, path: str, data: bytes, staged_side: str,
                 checkpoint: Callable[[str], None] | None = None) -> bool:
    """Rename ``staged`` (holding ``data``) over ``path`` so that its side file, where Hadoop kept one, is never
    stale: removed before the rename, written again for ``data`` after it (under ``staged_side``, then renamed).
    A crash in between leaves no side file, which Hadoop reads without checking; never a wrong one. Only local
    filesystems have side files. True when a side file was rewritten."""
    side = side_file(path)
    chunk = None
    if isinstance(filesystem, pafs.LocalFileSystem) and filesystem.get_file_info(side).type == pafs.FileType.File:
        with filesystem.open_input_stream(side) as stream:
            chunk = chunk_size(stream.read(8)) or DEFAULT_CHUNK
        filesystem.delete_file(side)
        if checkpoint is not None:
            checkpoint("checksum_removed")
    filesystem.move(staged, path)
    if chunk is None:
        return False
    with filesystem.open_output_stream(staged_side) as stream:
        stream.write(checksums(data, chunk))
    filesystem.move(staged_side, side)
    return True
