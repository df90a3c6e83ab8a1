"""The binary COPY encoder (server.importer.copybin): what PostgreSQL reads back from its
output equals the columns it was given (NULLs, empty and multi-byte texts, times around
both epochs, bigint extremes, several chunks, no rows), its bytes are those of a plain
row-by-row encoder, and columns it cannot encode are refused before any byte is made."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.importer import copybin
from server.importer.copybin import (
    HEADER,
    MIN_UNIX_MICROS,
    PG_EPOCH_UNIX_MICROS,
    TRAILER,
    BigintColumn,
    Column,
    TextColumn,
    TimestampColumn,
    binary_copy,
    dictionary,
)

UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# One row: n (bigint), a and b (text or NULL), t (timestamptz), u (timestamptz or NULL).
Row = tuple[int, str | None, str | None, int, int | None]


def columns_of(rows: Sequence[Row]) -> list[Column]:
    """The rows as copybin columns: each text column's dictionary holds its distinct
    strings once, NULL rows carry code -1 (which must not be read)."""

    def text(values: list[str | None]) -> TextColumn:
        distinct = sorted({v for v in values if v is not None})
        data, offsets = dictionary([v.encode() for v in distinct])
        code = {v: i for i, v in enumerate(distinct)}
        codes = np.array([-1 if v is None else code[v] for v in values], dtype=np.int32)
        valid = np.array([v is not None for v in values], dtype=np.bool_)
        return TextColumn(data, offsets, codes, valid)

    u = [r[4] for r in rows]
    return [
        BigintColumn(np.array([r[0] for r in rows], dtype=np.int64)),
        text([r[1] for r in rows]),
        text([r[2] for r in rows]),
        TimestampColumn(np.array([r[3] for r in rows], dtype=np.int64)),
        TimestampColumn(
            np.array([0 if v is None else v for v in u], dtype=np.int64),
            np.array([v is not None for v in u], dtype=np.bool_),
        ),
    ]


def reference(rows: Sequence[Row]) -> bytes:
    """The binary COPY rows (no header, no trailer), one row and one field at a time by
    struct."""
    out = []
    for n, a, b, t, u in rows:
        out.append(struct.pack(">hiq", 5, 8, n))
        for text in (a, b):
            if text is None:
                out.append(struct.pack(">i", -1))
            else:
                raw = text.encode()
                out.append(struct.pack(">i", len(raw)) + raw)
        out.append(struct.pack(">iq", 8, t - PG_EPOCH_UNIX_MICROS))
        out.append(
            struct.pack(">i", -1) if u is None else struct.pack(">iq", 8, u - PG_EPOCH_UNIX_MICROS)
        )
    return b"".join(out)


def at(micros: int) -> datetime:
    return UNIX_EPOCH + timedelta(microseconds=micros)


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    connection = await asyncpg.connect(db_url)
    await connection.execute(
        "CREATE TABLE copied (n bigint, a text, b text, t timestamptz, u timestamptz)"
    )
    yield connection
    await connection.close()


async def copy_back(
    conn: asyncpg.Connection[asyncpg.Record], rows: Sequence[Row], chunk_rows: int
) -> list[Row]:
    """COPY the rows' encoding into the table and read them back in order of n, times as
    Unix microseconds."""
    chunks = list(binary_copy(columns_of(rows), chunk_rows=chunk_rows))

    async def source() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    await conn.copy_to_table("copied", source=source(), format="binary")
    back = await conn.fetch("SELECT n, a, b, t, u FROM copied ORDER BY n")

    def micros(value: datetime | None) -> int | None:
        return None if value is None else (value - UNIX_EPOCH) // timedelta(microseconds=1)

    return [(r["n"], r["a"], r["b"], micros(r["t"]), micros(r["u"])) for r in back]  # type: ignore[misc]


def sample_rows() -> list[Row]:
    """Rows with every case the round trip pins, n in order."""
    times = [
        0,  # the Unix epoch
        PG_EPOCH_UNIX_MICROS,  # PostgreSQL's epoch
        PG_EPOCH_UNIX_MICROS - 1,  # a microsecond before it
        -1,  # a microsecond before 1970
        -62_135_596_800_000_000,  # 0001-01-01
        1_700_000_000_123_456,  # with microseconds
        253_402_300_799_999_999,  # 9999-12-31 23:59:59.999999
    ]
    texts: list[str | None] = ["alice", "", None, "zoë", "日本語", "🙂x", "a" * 300, "alice"]
    rows: list[Row] = []
    for i in range(40):
        t = times[i % len(times)]
        u = None if i % 3 == 0 else times[(i + 2) % len(times)]
        rows.append((i - 20, texts[i % len(texts)], texts[(i * 5) % len(texts)], t, u))
    return rows


async def test_rows_read_back_equal_the_columns_across_several_chunks(
    conn: asyncpg.Connection[asyncpg.Record],
) -> None:
    """Forty rows in chunks of 7 (the header in the first, the trailer after the last) come
    back from PostgreSQL as given: NULL texts and times as NULL, empty strings as empty,
    multi-byte UTF-8 intact, times before 2000 and before 1970 and with microseconds exact."""
    rows = sample_rows()
    assert len(list(binary_copy(columns_of(rows), chunk_rows=7))) == 6
    assert await copy_back(conn, rows, chunk_rows=7) == rows


async def test_bigint_extremes_and_a_single_chunk_read_back_exactly(
    conn: asyncpg.Connection[asyncpg.Record],
) -> None:
    """The smallest and largest bigint, 0 and -1 are written as PostgreSQL's int8, in one
    chunk when chunk_rows exceeds the rows."""
    rows: list[Row] = [
        (INT64_MIN, "x", None, 0, None),
        (-1, None, "y", 1, 2),
        (0, "", "", -1, -2),
        (INT64_MAX, "z", "z", 5, 5),
    ]
    assert len(list(binary_copy(columns_of(rows)))) == 1
    assert await copy_back(conn, rows, chunk_rows=1000) == rows


async def test_zero_rows_are_one_chunk_of_header_and_trailer(
    conn: asyncpg.Connection[asyncpg.Record],
) -> None:
    """No rows: one chunk, the header and the trailer, which PostgreSQL takes as an
    empty COPY."""
    chunks = list(binary_copy(columns_of([]), chunk_rows=3))
    assert chunks == [HEADER + TRAILER]
    assert await copy_back(conn, [], chunk_rows=3) == []


async def test_codes_of_any_integer_dtype_and_bigint_only_columns_are_taken(
    conn: asyncpg.Connection[asyncpg.Record],
) -> None:
    """Codes may be any integer dtype (uint8 up to its largest value here, whose code + 1
    must not wrap); a text column without `valid` has no NULLs."""
    strings = [b"s%d" % i for i in range(256)]
    data, offsets = dictionary(strings)
    codes = np.array([255, 0, 254], dtype=np.uint8)
    columns: list[Column] = [
        BigintColumn(np.array([1, 2, 3], dtype=np.int64)),
        TextColumn(data, offsets, codes),
        TextColumn(data, offsets, codes[::-1]),
        TimestampColumn(np.array([7, 8, 9], dtype=np.int64)),
        TimestampColumn(np.array([7, 8, 9], dtype=np.int64)),
    ]

    async def source() -> AsyncIterator[bytes]:
        for chunk in binary_copy(columns, chunk_rows=2):
            yield chunk

    await conn.copy_to_table("copied", source=source(), format="binary")
    back = await conn.fetch("SELECT n, a, b, t FROM copied ORDER BY n")
    assert [(r["n"], r["a"], r["b"], r["t"]) for r in back] == [
        (1, "s255", "s254", at(7)),
        (2, "s0", "s0", at(8)),
        (3, "s254", "s255", at(9)),
    ]


async def test_a_long_text_among_short_ones_reads_back(
    conn: asyncpg.Connection[asyncpg.Record],
) -> None:
    """One 3 MB text among a thousand short ones (a chunk padded to its widest text would
    be a thousand times its bytes, so it is written in place instead) reads back exact,
    as do the rows around it."""
    long = "é" * 1_500_000
    rows: list[Row] = [(i, "x" * (i % 9), None, i, None) for i in range(1000)]
    rows[500] = (500, long, "y", 0, 1)
    assert await copy_back(conn, rows, chunk_rows=400) == rows


def test_dictionary_is_the_large_string_layout() -> None:
    """dictionary gives Arrow's large_string buffers: the bytes one after another and
    int64 bounds starting at 0, one more than the strings."""
    data, offsets = dictionary([b"ab", b"", "é".encode()])
    assert data.dtype == np.uint8
    assert data.tobytes() == b"ab\xc3\xa9"
    assert offsets.dtype == np.int64
    assert offsets.tolist() == [0, 2, 2, 4]


def test_columns_that_cannot_be_encoded_are_refused_before_any_chunk() -> None:
    """No columns, columns of different lengths, arrays of other dtypes or shapes, a
    `valid` of another length, offsets beyond the data, a non-NULL row's code naming no
    string (negative, or past the last string) and a non-NULL time before PostgreSQL's
    first each raise ValueError at the first chunk, so no partial COPY is sent; a NULL
    row's code and time are not checked, and codes may be of any integer dtype."""
    data, offsets = dictionary([b"a", b"b"])
    times = TimestampColumn(np.zeros(2, dtype=np.int64))
    both = np.array([True, False])

    def codes(*values: int) -> TextColumn:
        return TextColumn(data, offsets, np.array(values), both)

    early = np.array([MIN_UNIX_MICROS - 1, MIN_UNIX_MICROS - 1], dtype=np.int64)
    bad: list[Sequence[Column]] = [
        [],
        [times, TimestampColumn(np.zeros(3, dtype=np.int64))],
        [TimestampColumn(np.zeros(2, dtype=np.int64), np.ones(1, dtype=np.bool_))],
        [TextColumn(data, np.array([0, 1, 5], dtype=np.int64), np.zeros(2, dtype=np.int64))],
        [times, codes(-1, 0)],
        [times, codes(2, 0)],
        [TimestampColumn(np.zeros(2, dtype=np.int32))],
        [BigintColumn(np.zeros((2, 1), dtype=np.int64))],
        [TimestampColumn(np.zeros(2, dtype=np.int64), np.ones(2, dtype=np.int8))],
        [TextColumn(data, offsets.astype(np.int32), np.zeros(2, dtype=np.int64))],
        [TextColumn(data, offsets, np.zeros(2, dtype=np.float64))],
        [TimestampColumn(early, np.array([False, True]))],
    ]
    for columns in bad:
        with pytest.raises(ValueError, match=r"column"):
            next(binary_copy(columns))
    fine: list[Column] = [times, codes(1, 99), TimestampColumn(early, np.zeros(2, dtype=np.bool_))]
    assert len(b"".join(binary_copy(fine))) > len(HEADER + TRAILER)
    uint = TextColumn(data, offsets, np.array([1, 0], dtype=np.uint64))
    assert len(b"".join(binary_copy([uint]))) == len(HEADER + TRAILER) + 2 * (2 + 4 + 1)


async def test_the_earliest_time_postgresql_takes_is_stored_as_that_time(
    conn: asyncpg.Connection[asyncpg.Record],
) -> None:
    """MIN_UNIX_MICROS, the earliest time binary_copy takes, is PostgreSQL's earliest
    timestamptz (4714-11-24 00:00:00 UTC BC), so every time it takes is one PostgreSQL
    takes as it is (a microsecond earlier is refused, test above)."""
    rows: list[Row] = [(1, None, None, MIN_UNIX_MICROS, None)]

    async def source() -> AsyncIterator[bytes]:
        for chunk in binary_copy(columns_of(rows)):
            yield chunk

    await conn.copy_to_table("copied", source=source(), format="binary")
    assert await conn.fetchval("SELECT t = '4714-11-24 00:00:00+00 BC' FROM copied") is True


times_st = st.integers(-62_135_596_800_000_000, 253_402_300_799_999_999)
texts_st = st.none() | st.sampled_from(["", "a", "zoë"]) | st.text(max_size=20)
rows_st = st.lists(
    st.tuples(
        st.integers(INT64_MIN, INT64_MAX), texts_st, texts_st, times_st, st.none() | times_st
    ),
    max_size=30,
)


@settings(max_examples=40, deadline=None)
@given(rows=rows_st, chunk_rows=st.integers(1, 8))
def test_the_bytes_are_a_row_by_row_encoders(rows: list[Row], chunk_rows: int) -> None:
    """For any rows and chunk size, the chunks joined are byte for byte what a plain
    struct-based encoder makes row by row, and each chunk holds chunk_rows rows (the
    header in the first, the trailer in the last), whichever way a chunk is laid out (in
    a matrix padded to its widest text, or scattered in place)."""
    chunks = list(binary_copy(columns_of(rows), chunk_rows=chunk_rows))
    assert b"".join(chunks) == HEADER + reference(rows) + TRAILER
    assert len(chunks) == max(1, -(-len(rows) // chunk_rows))
    columns = columns_of(rows)
    for i, chunk in enumerate(chunks):
        first, last = i == 0, i == len(chunks) - 1
        low, high = i * chunk_rows, min(len(rows), (i + 1) * chunk_rows)
        head, tail = (HEADER if first else b""), (TRAILER if last else b"")
        expected = head + reference(rows[low:high]) + tail
        assert chunk == expected
        for padded in (True, False):
            made = copybin._encode(columns, low, high, first=first, last=last, padded=padded)
            assert made == expected
