"""Columns of numpy arrays out, PostgreSQL's binary COPY format in: the bulk importer's
in-memory initial load hands millions of rows per table to COPY without a Python step per
row.

Rows are encoded a chunk at a time (binary_copy) by numpy array operations only. Each row's
byte length comes from its fields' (2 for the field count, then per field 4 for the length
and the value's bytes). When the chunk's texts are of similar, short lengths (ids), its rows
are laid out in a matrix, a row per row and a column block per field as wide as the field's
widest value (texts read from their dictionary as unaligned 8-byte words), and the matrix's
bytes are taken row by row through a mask that leaves the padding out (_padded).
Else the fixed-size fields are scattered as big-endian bytes to their places, the rows'
starts by a cumulative sum, and the texts' bytes gathered there, an index per byte
(_write_scattered). Memory stays bounded by the chunk: the matrix and its mask, or a few
index arrays as long as the chunk's text bytes.

The format (PostgreSQL's documentation, COPY, "Binary Format"): the header, then per row
the field count (int16) and per field its length (int32, -1 for NULL and then no bytes) and
its bytes, all big-endian; the trailer is -1 as int16. text is its UTF-8 bytes, bigint an
int64, timestamptz an int64 of microseconds since 2000-01-01 00:00:00 UTC.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike, NDArray

HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
TRAILER = (-1).to_bytes(2, "big", signed=True)

# PostgreSQL's timestamps count from 2000-01-01 00:00:00 UTC; this is that instant in Unix
# microseconds.
PG_EPOCH_UNIX_MICROS = 946_684_800_000_000
# PostgreSQL's earliest timestamp (4714-11-24 00:00:00 UTC, BC) in Unix microseconds: the
# subtraction of PG_EPOCH_UNIX_MICROS cannot wrap from there on (PostgreSQL refuses earlier
# times, but a wrapped one would pass as a time in the year 294247).
MIN_UNIX_MICROS = -211_813_488_000_000_000 + PG_EPOCH_UNIX_MICROS

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True, slots=True)
class TextColumn:
    """Each row's text is strings[codes[row]]: `data` the concatenated UTF-8 bytes of the
    distinct strings (uint8), `offsets` their bounds (int64, len = number of strings + 1),
    `codes` per row (any integer dtype); `valid` (bool per row) or None: NULL where False.

    data and offsets are Arrow's large_string layout, so an Arrow array's buffers (or
    `dictionary` for a small list) serve as they are; a NULL row's code is not read."""

    data: NDArray[np.uint8]
    offsets: NDArray[np.int64]
    codes: NDArray[np.integer]
    valid: NDArray[np.bool_] | None = None


@dataclass(frozen=True, slots=True)
class TimestampColumn:
    """timestamptz: microseconds since the Unix epoch (int64) per row; `valid` as above."""

    micros: NDArray[np.int64]
    valid: NDArray[np.bool_] | None = None


@dataclass(frozen=True, slots=True)
class BigintColumn:
    """bigint, never NULL."""

    values: NDArray[np.int64]


Column = TextColumn | TimestampColumn | BigintColumn


def dictionary(strings: list[bytes]) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """A TextColumn's data and offsets for `strings` (string i is code i)."""
    lengths = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))
    return laid_out(b"".join(strings), lengths)


def laid_out(
    joined: bytes, lengths: NDArray[np.int64]
) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """A TextColumn's data and offsets for strings given joined, with each one's length."""
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.frombuffer(bytearray(joined), dtype=np.uint8), offsets


def binary_copy(columns: Sequence[Column], *, chunk_rows: int = 250_000) -> Iterator[bytes]:
    """The rows (all columns the same length) as binary COPY data: the header with the
    first chunk, the trailer (-1 as int16) after the last; one bytes object per chunk_rows
    rows (zero rows: one chunk, the header and the trailer).

    Raises ValueError for no columns, columns of different lengths, arrays of other dtypes
    than the columns' (codes: any integer), a `valid` of another length, offsets that are
    not bounds within data, a non-NULL row's code that names no string, or a non-NULL time
    before PostgreSQL's first (checked before the first chunk is encoded, so no partial
    COPY data is sent)."""
    if not columns:
        raise ValueError("binary_copy needs at least one column")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, not {chunk_rows}")
    rows = _check(columns)
    chunks = max(1, -(-rows // chunk_rows))
    for index in range(chunks):
        low = index * chunk_rows
        high = min(rows, low + chunk_rows)
        yield _encode(columns, low, high, first=index == 0, last=index == chunks - 1)


def _length(column: Column) -> int:
    match column:
        case TextColumn():
            return len(column.codes)
        case TimestampColumn():
            return len(column.micros)
        case BigintColumn():
            return len(column.values)


def _check(columns: Sequence[Column]) -> int:
    """The number of rows, once the columns are known to encode (see binary_copy)."""
    rows = _length(columns[0])
    for number, column in enumerate(columns):
        if _length(column) != rows:
            raise ValueError(f"column {number} has {_length(column)} rows, not {rows}")
        valid = None if isinstance(column, BigintColumn) else column.valid
        if valid is not None and len(valid) != rows:
            raise ValueError(f"column {number}'s valid has {len(valid)} rows, not {rows}")
        match column:
            case TextColumn():
                _check_text(number, column)
            case TimestampColumn():
                _check_array(number, "micros", column.micros, np.int64)
                _check_array(number, "valid", column.valid, np.bool_)
                micros = column.micros if column.valid is None else column.micros[column.valid]
                if len(micros) and micros.min() < MIN_UNIX_MICROS:
                    raise ValueError(f"column {number} has times before 4714-11-24 BC")
            case BigintColumn():
                _check_array(number, "values", column.values, np.int64)
    return rows


def _check_array(
    number: int, name: str, array: NDArray[np.generic] | None, dtype: DTypeLike
) -> None:
    if array is not None and (array.ndim != 1 or not np.issubdtype(array.dtype, dtype)):
        raise ValueError(f"column {number}'s {name} is not a 1-d array of {dtype}")


def _check_text(number: int, column: TextColumn) -> None:
    _check_array(number, "data", column.data, np.uint8)
    _check_array(number, "offsets", column.offsets, np.int64)
    _check_array(number, "codes", column.codes, np.integer)
    _check_array(number, "valid", column.valid, np.bool_)
    offsets = column.offsets
    if len(offsets) < 1 or offsets[0] < 0 or offsets[-1] > len(column.data):
        raise ValueError(f"column {number}'s offsets are not bounds within its data")
    lengths = np.diff(offsets)
    if len(lengths) and (lengths.min() < 0 or lengths.max() > _INT32_MAX):
        raise ValueError(f"column {number}'s offsets do not bound strings COPY can take")
    codes = column.codes if column.valid is None else column.codes[column.valid]
    if len(codes) and (codes.min() < 0 or codes.max() >= len(lengths)):
        raise ValueError(f"column {number} has codes naming no string")


@dataclass(frozen=True, slots=True)
class _Fixed:
    """An int64 column's rows in a chunk: each row's int32 length (8, or -1 for NULL), its
    value's byte count (8, or 0 for NULL), where it is not NULL (None: everywhere) and the
    values (as PostgreSQL counts them)."""

    length: NDArray[np.int64]
    width: NDArray[np.int64]
    valid: NDArray[np.bool_] | None
    values: NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class _Text:
    """A text column's rows in a chunk: each row's int32 length (-1 for NULL), its byte
    count (0 for NULL), and where its bytes start in `data`."""

    length: NDArray[np.int64]
    width: NDArray[np.int64]
    data: NDArray[np.uint8]
    source: NDArray[np.int64]


_Field = _Fixed | _Text


def _field(column: Column, low: int, high: int) -> _Field:
    match column:
        case TextColumn():
            return _text_field(column, low, high)
        case TimestampColumn():
            micros = column.micros[low:high] - PG_EPOCH_UNIX_MICROS
            valid = None if column.valid is None else column.valid[low:high]
            return _fixed_field(micros, valid)
        case BigintColumn():
            return _fixed_field(column.values[low:high], None)


def _text_field(column: TextColumn, low: int, high: int) -> _Text:
    codes = column.codes[low:high].astype(np.int64, copy=False)
    valid = None if column.valid is None else column.valid[low:high]
    if valid is None:
        source = column.offsets[codes]
        width = column.offsets[codes + 1] - source
        length = width
    else:  # a NULL row's code is not read: its bounds are offsets[0] and offsets[0]
        source = column.offsets[np.where(valid, codes, 0)]
        width = column.offsets[np.where(valid, codes + 1, 0)] - source
        length = np.where(valid, width, -1)
    return _Text(length, width, column.data, source)


def _fixed_field(values: NDArray[np.int64], valid: NDArray[np.bool_] | None) -> _Fixed:
    if valid is None:
        width = np.full(len(values), 8, dtype=np.int64)
        return _Fixed(width, width, None, values)
    width = np.where(valid, 8, 0).astype(np.int64)
    return _Fixed(np.where(valid, 8, -1).astype(np.int64), width, valid, values)


# A chunk is laid out in a matrix, a row per row (_padded), when that matrix is at
# most _PAD_RATIO times the chunk's bytes and no text block is wider than _PAD_WIDEST: each
# field in a column block as wide as its widest value in the chunk, the bytes past a value's
# end masked out. Else (texts of very different lengths, or long ones) the chunk's bytes are
# written in place by scattered indices (_write_scattered), whose cost follows the bytes.
# Measured on 1,000,000 rows of (text, text, timestamptz, nullable timestamptz), texts of
# random lengths: padded/scattered CPU 0.52/0.68 s at 8 bytes (ratio 1.09), 0.59/0.66 at
# 1-16 (1.40), 0.99/1.02 at 1-32 (1.55), 1.52/1.30 at 1-64 (1.70), 2.8/0.74 at a mean of
# 10 bytes up to 200 (5.2).
_PAD_RATIO = 1.5
_PAD_WIDEST = 256


def _encode(
    columns: Sequence[Column],
    low: int,
    high: int,
    *,
    first: bool,
    last: bool,
    padded: bool | None = None,
) -> bytes:
    """Rows low..high as binary COPY data, after the header if `first`, before the
    trailer if `last`; laid out in a matrix if `padded` (None: if it is not too wide)."""
    rows = high - low
    fields = [_field(column, low, high) for column in columns]
    row_bytes = np.full(rows, 2 + 4 * len(fields), dtype=np.int64)
    for field in fields:
        row_bytes += field.width
    row_end = np.cumsum(row_bytes)
    size = int(row_end[-1]) if rows else 0
    blocks = [8 if isinstance(f, _Fixed) else int(f.width.max(initial=0)) for f in fields]
    if padded is None:
        matrix = rows * (2 + 4 * len(fields) + sum(blocks))
        padded = max(blocks, default=0) <= _PAD_WIDEST and matrix <= _PAD_RATIO * size
    if padded:
        body = _padded(fields, blocks)
    else:
        body = np.empty(size, dtype=np.uint8)
        _write_scattered(body, row_end - row_bytes, fields)
    # bytes.join copies the body once (its buffer), header and trailer around it.
    return b"".join((HEADER if first else b"", body.data, TRAILER if last else b""))


def _padded(fields: list[_Field], blocks: list[int]) -> NDArray[np.uint8]:
    """The rows' bytes, laid out first in a matrix (a row per row, a column block per
    field as wide as `blocks` says, the bytes past each value masked out) and then taken
    from it by the mask, row by row."""
    rows = len(fields[0].length) if fields else 0
    matrix = np.empty((rows, 2 + sum(4 + block for block in blocks)), dtype=np.uint8)
    mask = np.ones(matrix.shape, dtype=np.bool_)
    matrix[:, :2] = np.frombuffer(len(fields).to_bytes(2, "big"), dtype=np.uint8)
    at = 2
    for field, block in zip(fields, blocks, strict=True):
        if isinstance(field, _Fixed) and field.valid is None:  # always 8
            matrix[:, at : at + 4] = np.frombuffer((8).to_bytes(4, "big"), dtype=np.uint8)
        else:
            matrix[:, at : at + 4] = _bytes_of(field.length.astype(">i4"))
        at += 4
        if isinstance(field, _Fixed):
            matrix[:, at : at + 8] = _bytes_of(field.values.astype(">i8"))
            if field.valid is not None:
                mask[:, at : at + 8] = field.valid[:, None]
        elif block:
            matrix[:, at : at + block] = _words(field.data, field.source, block)
            np.less(np.arange(block), field.width[:, None], out=mask[:, at : at + block])
        at += block
    return matrix[mask]  # (np.compress took 4 times as long)


def _bytes_of(values: NDArray[np.generic]) -> NDArray[np.uint8]:
    """A 1-d array's values as a matrix of their bytes, a row per value."""
    return values.view(np.uint8).reshape(len(values), values.dtype.itemsize)


def _words(data: NDArray[np.uint8], source: NDArray[np.int64], width: int) -> NDArray[np.uint8]:
    """A matrix whose row i is the `width` bytes of data from source[i] on (zeros past the
    end of data), read as unaligned uint64 words, a word per row at a time (a byte per
    row at a time costs an index per byte)."""
    count = -(-width // 8)
    words = np.empty((len(source), count), dtype="<u8")
    # Rows whose words would leave data read from a copy of its end with zeros after it.
    base = max(0, len(data) - 8 * count)
    near = np.flatnonzero(source >= base)
    tail = np.zeros(len(data) - base + 8 * count, dtype=np.uint8)
    tail[: len(data) - base] = data[base:]
    if len(data) >= 8:
        whole = _unaligned_words(np.ascontiguousarray(data))
        position = np.minimum(source, len(data) - 8)  # rows near the end: rewritten below
        for word in range(count):
            words[:, word] = whole[position]
            position += 8
            np.minimum(position, len(data) - 8, out=position)
    position = source[near] - base
    ending = _unaligned_words(tail)
    for word in range(count):
        words[near, word] = ending[position + 8 * word]
    return words.view(np.uint8)[:, :width]


def _unaligned_words(data: NDArray[np.uint8]) -> NDArray[np.uint64]:
    """Every 8 bytes of a contiguous `data` as a little-endian uint64, one per byte offset
    (a view: element i is data[i : i + 8])."""
    return np.ndarray((len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))


def _write_scattered(buf: NDArray[np.uint8], at: NDArray[np.int64], fields: list[_Field]) -> None:
    """The rows into buf, the rows starting at `at`: the fixed-size fields scattered as
    big-endian bytes, the texts gathered (_gather)."""
    _scatter(buf, at, np.full(len(at), len(fields), dtype=">i2"))
    at = at + 2
    for field in fields:
        _scatter(buf, at, field.length.astype(">i4"))
        at += 4
        if isinstance(field, _Text):
            _gather(buf, at, field.data, field.source, field.width)
        elif field.valid is None:
            _scatter(buf, at, field.values.astype(">i8"))
        else:
            _scatter(buf, at[field.valid], field.values[field.valid].astype(">i8"))
        at += field.width


def _scatter(buf: NDArray[np.uint8], at: NDArray[np.int64], values: NDArray[np.generic]) -> None:
    """Write each of `values` (a big-endian dtype) as its bytes at buf[at[i]:]."""
    width = values.dtype.itemsize
    buf[at[:, None] + np.arange(width)] = _bytes_of(values)


def _gather(
    buf: NDArray[np.uint8],
    at: NDArray[np.int64],
    data: NDArray[np.uint8],
    source: NDArray[np.int64],
    width: NDArray[np.int64],
) -> None:
    """Copy data[source[i] : source[i] + width[i]] to buf[at[i]:] for every row at once:
    byte k of the chunk's texts (T bytes in all) comes from source + (k - the bytes of the
    texts before its row's) and goes to at + the same."""
    before = np.cumsum(width) - width
    count = int(before[-1] + width[-1]) if len(width) else 0
    if count == 0:
        return
    k = np.arange(count, dtype=np.int64)
    buf[k + np.repeat(at - before, width)] = data[k + np.repeat(source - before, width)]
