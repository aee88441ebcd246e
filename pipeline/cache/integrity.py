"""Checksums of a shard's parts, so a reader can verify exactly the bytes it reads.

A Parquet shard is its 4-byte magic, then every row group's column chunks back to back,
then the footer (file metadata, its length, the magic again). A CRC-32 of each column
chunk's byte range (from the footer's offsets) and one of the footer itself cover every
byte a reader uses: reading one column of one row group verifies that chunk alone, never
the whole shard. CRC-32 because it is what storage formats use against accidental
corruption (Parquet's own page checksums, zip, gzip): it catches every burst of up to 32
flipped bits, and zlib's runs several times faster than sha256 here; the manifest keeps a
whole-file sha256 beside it for `ddk cache verify`.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ALGORITHM = "crc32"
_TRAILER = struct.Struct("<I4s")  # footer length, b"PAR1"


def crc32_hex(data) -> str:
    return f"{zlib.crc32(data):08x}"


def chunk_ranges(metadata: pq.FileMetaData) -> list[list[tuple[int, int]]]:
    """[row group][column] -> (offset, length) of that column chunk in the file."""
    ranges = []
    for g in range(metadata.num_row_groups):
        rg = metadata.row_group(g)
        row = []
        for c in range(rg.num_columns):
            col = rg.column(c)
            # A chunk starts at its dictionary page when it has one; total_compressed_size
            # spans the dictionary and data pages with their headers.
            start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            row.append((start, col.total_compressed_size))
        ranges.append(row)
    return ranges


def footer_range(data) -> tuple[int, int]:
    """(offset, length) of the footer, trailer included, in the file's bytes `data`."""
    size = len(data)
    if size < 12:
        raise ValueError(f"{size} bytes is too short for a Parquet file")
    length, magic = _TRAILER.unpack_from(data, size - _TRAILER.size)
    if magic != b"PAR1" or length + _TRAILER.size + 4 > size:
        raise ValueError("no Parquet footer at the end of the file (truncated or not Parquet)")
    start = size - _TRAILER.size - length
    return start, size - start


def shard_checksums(data, metadata: pq.FileMetaData) -> dict:
    """The manifest's `crc32` entry of a shard: its footer's and every column chunk's CRC-32.

    `data`: the whole file's bytes (a memory map or bytes), `metadata`: its parsed footer.
    """
    view = memoryview(data)
    start, length = footer_range(view)
    return {
        "footer": crc32_hex(view[start : start + length]),
        "row_groups": [[crc32_hex(view[o : o + n]) for o, n in row] for row in chunk_ranges(metadata)],
    }


def file_digests(path: Path) -> dict:
    """A finished shard's manifest digests: the whole file's sha256 and its `crc32` entry,
    from one memory map of the file."""
    with pa.memory_map(str(path)) as mm:
        data = mm.read_buffer()
        return {"sha256": hashlib.sha256(data).hexdigest(),
                "crc32": shard_checksums(data, pq.read_metadata(pa.BufferReader(data)))}
