"""CSV in, COPY records out: the reading half of `follow-server import`.

Plain rows (one line each, no quoting, ids and times of the usual shape) are checked a chunk
at a time by one regular expression and handed to COPY as they are (FastReader); from the
first chunk that does not fit, rows are read by the csv module and checked one by one in
Python (ids by `rules.user_id_problem`, times), keeping the file's line numbers, which is
how bad rows are reported. What only the database can see (unknown accounts, duplicates,
the cap) is left to server.importer.staging.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Never, TextIO

from tqdm import tqdm

from server import rules
from server.importer.report import BadRow, ImportReport

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_time_us(text: str) -> int | None:
    """Unix seconds (with an optional fraction, truncated to microseconds) or ISO-8601, as
    microseconds since the epoch; None when it is neither."""
    sec, dot, frac = text.partition(".")
    if sec.isdigit() and (not dot or frac.isdigit()):
        return int(sec) * 1_000_000 + (int(frac[:6].ljust(6, "0")) if frac else 0)
    try:
        if sec.startswith("-") and sec[1:].isdigit() and (not dot or frac.isdigit()):
            micros = int(frac[:6].ljust(6, "0")) if frac else 0
            return int(sec) * 1_000_000 - micros
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return (at - _EPOCH) // _ONE_MICROSECOND


_ONE_MICROSECOND = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - _EPOCH

# The fast path: records that are one line of plain fields each (printable ASCII without
# quotes, commas or backslashes, so CSV quoting, COPY's `\.` and line counting are moot),
# checked a whole chunk at a time by one regular expression and handed to COPY as they are.
# Such an id passes rules.user_id_problem and such a profile field passes
# rules.profile_field_problem; the time is Unix seconds with an optional fraction. What the
# patterns refuse is not necessarily bad: it goes to the slow path, which decides.
FAST_CHARS = r"!#-+\--\[\]-~"  # printable ASCII but space, quote, comma and backslash
FAST_ID = f"[{FAST_CHARS}]{{1,{rules.MAX_USER_ID_BYTES}}}"
FAST_TEXT = f"[ {FAST_CHARS}]{{0,{rules.MAX_PROFILE_FIELD_BYTES}}}"
FAST_TIME = r"[0-9]{1,12}(?:\.[0-9]{1,9})?"
_FAST_CHUNK = 1 << 20  # characters per regular-expression match and COPY message


@dataclass(frozen=True, slots=True)
class Shape:
    """One CSV layout of a file: its header, and per field count the fast pattern and the
    staging columns its fields go to."""

    source: str
    header: tuple[str, ...]
    fields: dict[int, tuple[re.Pattern[str], tuple[str, ...]]]


def _lines_of(*fields: str) -> re.Pattern[str]:
    return re.compile(f"(?:{','.join(fields)}\n)*")


ACCOUNTS = Shape(
    "accounts",
    ("user_id",),
    {
        1: (_lines_of(FAST_ID), ("user_id",)),
        2: (_lines_of(FAST_ID, FAST_TEXT), ("user_id", "nick")),
        3: (_lines_of(FAST_ID, FAST_TEXT, FAST_TEXT), ("user_id", "nick", "face_url")),
    },
)
EDGES = Shape(
    "edges",
    ("follower_id",),
    {
        2: (_lines_of(FAST_ID, FAST_ID), ("follower", "target")),
        3: (_lines_of(FAST_ID, FAST_ID, FAST_TIME), ("follower", "target", "at")),
    },
)


class FastReader:
    """The leading part of a CSV stream that the fast path takes, as COPY data.

    Iterate it for the encoded chunks, each row led by its line number; then `columns` is
    the staging columns they fill (`line` first), and `rest()` the lines it left to the slow
    path (from the first chunk that the pattern refused), numbered after `lines_used`."""

    def __init__(self, stream: TextIO, shape: Shape, bar: tqdm[Never]) -> None:
        self._stream = stream
        self._shape = shape
        self._bar = bar
        self._pending = ""  # read but not taken: the slow path starts here
        self.lines_used = 0  # lines taken: the header and the fast rows
        self.columns: tuple[str, ...] = ()
        self.rows = 0

    def _read(self) -> str:
        text = self._stream.read(_FAST_CHUNK)
        self._bar.update(len(text))
        return text

    async def __aiter__(self) -> AsyncIterator[bytes]:
        buffer = self._read()
        while "\n" not in buffer and (more := self._read()):
            buffer += more
        first, newline, after = buffer.partition("\n")
        if newline and '"' not in first and is_header(first.split(","), self._shape.header):
            buffer = after
            self.lines_used = 1
        fields = self._shape.fields.get(buffer.partition("\n")[0].count(",") + 1)
        if fields is None:
            self._pending = buffer
            return
        pattern, columns = fields
        self.columns = ("line", *columns)
        at_end = False
        while buffer:
            if not at_end and len(buffer) < _FAST_CHUNK:
                more = self._read()
                at_end = not more
                buffer += more
                continue
            cut = buffer.rfind("\n", 0, _FAST_CHUNK) + 1
            if cut == 0:  # a line longer than a chunk, or a last line without a newline
                if not at_end and len(buffer) < 4 * _FAST_CHUNK:
                    more = self._read()
                    at_end = not more
                    buffer += more
                    continue
                break
            chunk = buffer[:cut]
            if pattern.fullmatch(chunk) is None:
                break
            buffer = buffer[cut:]
            yield _numbered(chunk, self.lines_used + 1)
            lines = chunk.count("\n")
            self.lines_used += lines
            self.rows += lines
        self._pending = buffer

    def rest(self) -> Iterator[str]:
        """The lines the fast path left, as the stream gives them."""
        if self._pending:
            # Chunks end wherever a read ended: finish the line the last one cut.
            self._pending += self._stream.readline()
            yield from io.StringIO(self._pending, newline="")
        yield from _sized(self._stream, self._bar)


def _numbered(chunk: str, first: int) -> bytes:
    """A chunk of whole lines as COPY data, each led by its line number (from `first`).
    Numbered here rather than by a sequence default in the staging table: COPY spent 40%
    of its CPU on nextval (5.9 s against 3.6 s for 5,000,000 rows), which is the database's
    core, while this costs the importer's own ~0.4 us a row."""
    lines = chunk.split("\n")
    lines.pop()  # a chunk ends with a newline
    numbers = map(str, range(first, first + len(lines)))
    return ("\n".join(map(",".join, zip(numbers, lines, strict=True))) + "\n").encode()


class IdChecker:
    """`rules.user_id_problem`, remembered for ids already seen valid (a graph names each
    user many times)."""

    def __init__(self) -> None:
        self.valid: set[str] = set()

    def problem(self, user_id: str) -> str | None:
        if user_id in self.valid:
            return None
        problem = rules.user_id_problem(user_id)
        if problem is None:
            self.valid.add(user_id)
        return problem


def csv_rows(
    lines: Iterable[str], header: tuple[str, ...], skip_header: bool, offset: int
) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each CSV record; blank lines and a header row are skipped.
    `offset` lines came before `lines`; a header is looked for only when `skip_header`."""
    reader = csv.reader(lines, strict=True)
    first = skip_header
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield offset + reader.line_num, [f"\x00{exc}"]  # reported as malformed by the caller
            continue
        if first:
            first = False
            if is_header(row, header):
                continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        yield offset + reader.line_num, row


def account_records(
    rows: Iterable[tuple[int, list[str]]], ids: IdChecker, report: ImportReport
) -> Iterator[tuple[int, str, str | None, str | None]]:
    """COPY records (line, user_id, nick, face_url) of the good account rows (slow path)."""
    for line, row in rows:
        report.accounts_read += 1
        problem = _malformed(row, 1, 3, "user_id[,nick[,face_url]]")
        if problem is None:
            problem = ids.problem(row[0])
        nick = row[1] if len(row) > 1 and row[1] != "" else None
        face = row[2] if len(row) > 2 and row[2] != "" else None
        if problem is None and nick is not None:
            problem = _profile_problem("nick", nick)
        if problem is None and face is not None:
            problem = _profile_problem("face_url", face)
        if problem is not None:
            report.add_bad(BadRow("accounts", line, problem))
            continue
        yield line, row[0], nick, face


def _profile_problem(name: str, value: str) -> str | None:
    if value.isascii() and len(value) <= rules.MAX_PROFILE_FIELD_BYTES and "\x00" not in value:
        return None  # the common case, without a per-character scan
    return rules.profile_field_problem(name, value)


def edge_records(
    rows: Iterable[tuple[int, list[str]]], ids: IdChecker, report: ImportReport
) -> Iterator[tuple[int, str, str, Decimal | None, str | None]]:
    """COPY records (line, follower, target, followed_at in seconds or None for now, problem)
    of the edge rows that pass what Python checks (slow path). Unknown accounts are found in
    SQL; a bad time is staged as a problem, reported only when the accounts are known (the
    order of the checks decides which problem a row shows)."""
    for line, row in rows:
        report.edges_read += 1
        problem = _malformed(row, 2, 3, "follower_id,target_id[,followed_at]")
        if problem is None and (problem := ids.problem(row[0])) is not None:
            problem = f"follower_id: {problem}"
        if problem is None and (problem := ids.problem(row[1])) is not None:
            problem = f"target_id: {problem}"
        if problem is None and row[0] == row[1]:
            problem = "a user cannot follow themselves"
        if problem is not None:
            report.add_bad(BadRow("edges", line, problem))
            continue
        at: Decimal | None = None
        if len(row) == 3 and row[2]:
            at_us = parse_time_us(row[2])
            if at_us is None:
                problem = f"followed_at: {row[2]!r} is neither Unix seconds nor ISO-8601"
            else:
                at = Decimal(at_us).scaleb(-6)
        yield line, row[0], row[1], at, problem


def is_header(row: list[str], header: tuple[str, ...]) -> bool:
    return tuple(f.strip().lower() for f in row[: len(header)]) == header


def _malformed(row: list[str], least: int, most: int, shape: str) -> str | None:
    if len(row) == 1 and row[0].startswith("\x00"):
        return f"malformed CSV: {row[0][1:]}"
    if not least <= len(row) <= most:
        return f"expected {shape}, got {len(row)} field(s)"
    return None


def _sized(stream: Iterable[str], bar: tqdm[Never]) -> Iterator[str]:
    """The stream's lines, advancing `bar` by the characters read (≈ bytes of ASCII CSV)."""
    pending = 0
    for line in stream:
        pending += len(line)
        if pending >= 1 << 20:
            bar.update(pending)
            pending = 0
        yield line
    bar.update(pending)
