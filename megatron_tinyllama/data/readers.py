"""Input formats for preprocessing: finding files, cutting them into work units, parsing units.

This module owns everything between bytes on disk and document strings: which files an
``--input`` names (files, globs, directories), how each format is read in bounded pieces
(jsonl, jsonl.zst, parquet, plain text), and how a piece becomes documents, with the record
filters and the bad-input rules:

* jsonl (``.jsonl``, ``.json``, optionally ``.zst``): one JSON object per line; blank lines are
  ignored. A line that is not UTF-8, not JSON, not an object, or lacks a key (or holds a
  non-string, or a string with a lone surrogate from a ``\\ud800`` escape) is a *bad line*: an
  error naming file and line, or counted with ``skip_bad_lines``. A UTF-8 byte-order mark at
  the start of a file is dropped (jsonl and text), as Python's ``utf-8-sig`` does.
* parquet (``.parquet``): one document per row, read in row batches; a missing column is an
  error for the whole file; a null cell is a bad line (rows are counted from 1).
* text (``.txt``, ``.text``, optionally ``.zst``): one document per file (``text_mode="file"``;
  the file is read whole, as the document it is) or per non-blank line (``"line"``, streamed);
  the json key only names the output.
* A zero-byte file is bad input: an error, or a skipped file with ``skip_bad_lines``.
* A ``.zst`` file whose compressed stream ends inside a frame (cut short) is an error that says
  "truncated", whatever byte it was cut at, even with ``skip_bad_lines``: part of a file is not
  a document set anyone asked for.

The main process only cuts files into :class:`WorkUnit` s (cheap); parsing and filtering
(:func:`parse_unit`) run in the workers, next to tokenization.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional, Sequence

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst")
TEXT_SUFFIXES = (".txt", ".text", ".txt.zst", ".text.zst")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES
PARQUET_BATCH_ROWS = 1024


class BadInputError(ValueError):
    """Input that cannot be turned into documents: names the file and, when known, the line.

    Attributes:
        path: The input file.
        line: 1-based line (jsonl, text) or row (parquet) number, or None for file-level errors.
        message: What is wrong.
        skippable: True when ``skip_bad_lines`` may count it and go on (bad lines, empty files).
    """

    def __init__(self, path: str, line: Optional[int], message: str, skippable: bool = False):
        self.path, self.line, self.message, self.skippable = path, line, message, skippable
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


Format = Literal["jsonl", "parquet", "text"]


def input_format(path: str) -> Format:
    """The format a file name implies; raises BadInputError for unsupported suffixes."""
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    raise BadInputError(path, None, f"unsupported input type (expected one of "
                                    f"{', '.join(SUPPORTED_SUFFIXES)})")


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files named by ``--input``: files as given, globs and directories expanded and sorted.

    Directories are searched recursively for supported suffixes. The order is deterministic
    (the order of the arguments, then sorted within a glob or directory), so the output dataset
    is the same on every run. Duplicates are dropped.

    Raises:
        BadInputError: An argument matches no file, or names a file of an unsupported type.
    """
    found: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            matches = sorted(
                os.path.join(root, name)
                for root, _dirs, names in os.walk(item)
                for name in names
                if name.lower().endswith(SUPPORTED_SUFFIXES)
            )
            if not matches:
                raise BadInputError(item, None, "directory holds no supported input files")
        elif os.path.isfile(item):
            input_format(item)
            matches = [item]
        else:
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            matches = [p for p in matches if p.lower().endswith(SUPPORTED_SUFFIXES)]
            if not matches:
                raise BadInputError(item, None, "no such file, or the pattern matches no "
                                                "supported input files")
        found.extend(matches)
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class WorkUnit:
    """A piece of one input file, small enough to hold in memory, parsed by one worker.

    Attributes:
        path: Input file.
        fmt: Its format.
        first_line: Line (or row) number of the first record in ``payload``, 1-based.
        payload: Complete lines (bytes) for jsonl/text, or a pyarrow RecordBatch for parquet.
        nbytes: On-disk bytes this unit accounts for (progress and throughput).
    """

    path: str
    fmt: Format
    first_line: int
    payload: Any
    nbytes: int


def _open_binary(path: str) -> tuple[Any, Any]:
    raw = open(path, "rb")
    if path.lower().endswith(".zst"):
        return _ZstdFrames(path, raw), raw
    return raw, raw


class _ZstdFrames:
    """Decompresses the frames of a ``.zst`` file one after another, and knows where they end.

    zstandard's ``stream_reader`` returns end-of-file when the compressed bytes run out, even in
    the middle of a frame: a file cut at a block boundary then reads as a shorter, valid file,
    and one cut inside a block as a file whose last line is malformed. Here the end of the
    compressed bytes inside an unfinished frame is an error that says so. (A cut exactly between
    two complete frames leaves a valid file and cannot be told apart from a shorter one.)
    """

    _INPUT_BYTES = 1 << 17  # compressed bytes per step: bounds what one step decompresses

    def __init__(self, path: str, raw) -> None:
        import zstandard

        self._path, self._raw = path, raw
        self._context = zstandard.ZstdDecompressor()
        self._frame = None  # decompressor of the frame in progress, None between frames
        self._buffer = bytearray()
        self._decompressed = 0

    def read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            data = self._raw.read(self._INPUT_BYTES)
            if not data:
                if self._frame is not None:
                    raise BadInputError(self._path, None, (
                        f"truncated: the zstd stream ends inside a frame, after "
                        f"{self._decompressed} decompressed bytes (an interrupted download or "
                        f"copy?); nothing of this file is used"))
                break
            self._feed(data)
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    def _feed(self, data: bytes) -> None:
        while data:
            if self._frame is None:
                self._frame = self._context.decompressobj()
            out = self._frame.decompress(data)
            self._buffer += out
            self._decompressed += len(out)
            if not self._frame.eof:
                return
            data, self._frame = self._frame.unused_data, None

    def close(self) -> None:
        self._buffer.clear()


def iter_units(path: str, *, chunk_bytes: int = 1 << 20, text_mode: str = "file",
               columns: Sequence[str] = (), optional_columns: Sequence[str] = ()
               ) -> Iterator[WorkUnit]:
    """Cut one file into work units of about ``chunk_bytes`` (always whole lines).

    Args:
        path: Input file.
        chunk_bytes: Target (decompressed) bytes per unit.
        text_mode: For text files, ``"file"`` (one document per file) or ``"line"``.
        columns: For parquet, the columns to read (top-level names; missing ones are an error).
        optional_columns: For parquet, columns read when present (record filters).

    Raises:
        BadInputError: Empty (zero-byte) file (skippable), unreadable or corrupt file.
    """
    fmt = input_format(path)
    if os.path.getsize(path) == 0:
        raise BadInputError(path, None, "empty file (0 bytes)", skippable=True)
    if fmt == "parquet":
        yield from _parquet_units(path, columns, optional_columns)
        return
    stream, raw = _open_binary(path)
    try:
        if fmt == "text" and text_mode == "file":
            data = _read_all(path, stream)
            yield WorkUnit(path, fmt, 1, data, raw.tell())
            return
        line, consumed = 1, 0
        pending: list[bytes] = []  # bytes of the line in progress (lines may exceed a block)
        while block := _read_block(path, stream, chunk_bytes):
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                pending.append(block)
                continue
            unit = b"".join([*pending, block[:cut]])
            pending = [block[cut:]] if cut < len(block) else []
            position = raw.tell()
            yield WorkUnit(path, fmt, line, unit, position - consumed)
            consumed = position
            line += unit.count(b"\n")
        if pending:
            yield WorkUnit(path, fmt, line, b"".join(pending), raw.tell() - consumed)
    finally:
        stream.close()
        raw.close()


def _read_block(path: str, stream, size: int) -> bytes:
    try:
        return stream.read(size)
    except BadInputError:
        raise
    except Exception as err:  # zstandard.ZstdError and OSError
        raise BadInputError(path, None, f"cannot read ({type(err).__name__}: {err})") from None


def _read_all(path: str, stream) -> bytes:
    parts = []
    while block := _read_block(path, stream, 1 << 24):
        parts.append(block)
    return b"".join(parts)


def _parquet_units(path: str, columns: Sequence[str],
                   optional_columns: Sequence[str]) -> Iterator[WorkUnit]:
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except Exception as err:  # pyarrow.ArrowInvalid and OSError
        raise BadInputError(path, None, f"not a readable parquet file ({err})") from None
    names = set(pfile.schema_arrow.names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise BadInputError(path, None, f"column(s) {missing} not in parquet schema "
                                        f"(columns: {sorted(names)})")
    wanted = list(dict.fromkeys([*columns, *(c for c in optional_columns if c in names)]))
    total_rows = max(1, pfile.metadata.num_rows)
    size = os.path.getsize(path)
    row, accounted = 1, 0
    for batch in pfile.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
        done = row - 1 + batch.num_rows
        nbytes = size * done // total_rows - accounted
        accounted += nbytes
        yield WorkUnit(path, "parquet", row, batch, nbytes)
        row = done + 1


@dataclass
class ParsedUnit:
    """Documents of one unit, per output key, and what was dropped on the way.

    Attributes:
        texts: Per json key, the document strings in input order.
        counts: ``records``, ``filtered``, ``blank_lines``, ``bad_lines`` and ``bad:<reason>``.
        errors: (line, message) of each bad line, in order (only the first is reported when
            bad lines are fatal).
    """

    texts: dict[str, list[str]]
    counts: Counter = field(default_factory=Counter)
    errors: list[tuple[int, str]] = field(default_factory=list)


def _lookup(record: Any, dotted: str) -> Any:
    node = record
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _excluded(record: Any, excludes: Sequence[tuple[str, str]]) -> bool:
    for dotted, value in excludes:
        found = _lookup(record, dotted)
        if found is not _MISSING and str(found) == value:
            return True
    return False


def parse_unit(unit: WorkUnit, json_keys: Sequence[str],
               excludes: Sequence[tuple[str, str]] = (), text_mode: str = "file") -> ParsedUnit:
    """Turn a work unit into document strings per key, applying filters and bad-line rules.

    Args:
        unit: The piece of input.
        json_keys: Keys (jsonl) or columns (parquet) that hold documents; one output each.
        excludes: (dotted field, value) pairs: a record whose field equals value is dropped
            (e.g. ``("meta.redpajama_set_name", "RedPajamaGithub")``).
        text_mode: For text units, ``"file"`` or ``"line"``.

    Returns:
        The parsed unit; bad lines are listed in ``errors`` (the caller decides whether they
        are fatal).
    """
    parsed = ParsedUnit({key: [] for key in json_keys})
    if unit.fmt == "jsonl":
        _parse_jsonl(unit, json_keys, excludes, parsed)
    elif unit.fmt == "parquet":
        _parse_parquet(unit, json_keys, excludes, parsed)
    else:
        _parse_text(unit, json_keys, text_mode, parsed)
    return parsed


def _bad(parsed: ParsedUnit, line: int, reason: str, message: str) -> None:
    parsed.counts["bad_lines"] += 1
    parsed.counts[f"bad:{reason}"] += 1
    parsed.errors.append((line, message))


def _accept(record: Any, line: int, json_keys: Sequence[str], excludes, parsed: ParsedUnit,
            what: str = "key") -> None:
    values = []
    for key in json_keys:
        value = record.get(key, _MISSING) if isinstance(record, dict) else _MISSING
        if value is _MISSING:
            present = sorted(record)[:10] if isinstance(record, dict) else []
            return _bad(parsed, line, "missing_key", f"missing {what} {key!r} (present: {present})")
        if not isinstance(value, str):
            return _bad(parsed, line, "not_a_string",
                        f"{what} {key!r} holds {type(value).__name__}, not a string")
        values.append(value)
    parsed.counts["records"] += 1
    if excludes and _excluded(record, excludes):
        parsed.counts["filtered"] += 1
        return None
    for key, value in zip(json_keys, values):
        parsed.texts[key].append(value)
    return None


def _lines(payload: bytes) -> list[bytes]:
    lines = payload.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the piece after the final newline is not a line
    return lines


_BOM = b"\xef\xbb\xbf"
# A JSON \u escape of a UTF-16 surrogate (D800-DFFF): the only way a lone surrogate, which no
# UTF-8 text can hold, gets into a decoded string.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _strip_bom(unit: WorkUnit, offset: int, raw: bytes) -> bytes:
    """The first line of a file without a UTF-8 byte-order mark (as Python's ``utf-8-sig``)."""
    if unit.first_line == 1 and offset == 0 and raw.startswith(_BOM):
        return raw[len(_BOM):]
    return raw


def _lone_surrogate(record: dict, json_keys) -> Optional[str]:
    """Message for the first document value holding a lone surrogate, else None."""
    for key in json_keys:
        value = record.get(key)
        if not isinstance(value, str):
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return (f"key {key!r} holds a lone surrogate U+{ord(value[err.start]):04X} at "
                    f"character {err.start + 1} (a \\u escape with no pair: not text, cannot be "
                    f"encoded as UTF-8)")
    return None


def _parse_jsonl(unit: WorkUnit, json_keys, excludes, parsed: ParsedUnit) -> None:
    for offset, raw in enumerate(_lines(unit.payload)):
        line = unit.first_line + offset
        raw = _strip_bom(unit, offset, raw)
        if not raw or raw.isspace():  # no copy of the line, as strip() would make
            parsed.counts["blank_lines"] += 1
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            _bad(parsed, line, "not_utf8", f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at "
                                           f"column {err.start + 1})")
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            _bad(parsed, line, "bad_json", f"malformed JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(record, dict):
            _bad(parsed, line, "not_an_object", f"expected a JSON object, got "
                                                f"{type(record).__name__}")
            continue
        # Checked only where an escape could have made one: encoding every document twice would
        # cost a copy of it.
        surrogate = _SURROGATE_ESCAPE.search(raw) and _lone_surrogate(record, json_keys)
        if surrogate:
            _bad(parsed, line, "lone_surrogate", surrogate)
            continue
        _accept(record, line, json_keys, excludes, parsed)


def _parse_parquet(unit: WorkUnit, json_keys, excludes, parsed: ParsedUnit) -> None:
    rows = unit.payload.to_pylist()
    for offset, record in enumerate(rows):
        line = unit.first_line + offset
        nulls = [key for key in json_keys if record.get(key) is None]
        if nulls:
            _bad(parsed, line, "null_value", f"column {nulls[0]!r} is null in row {line}")
            continue
        _accept(record, line, json_keys, excludes, parsed, what="column")


def _parse_text(unit: WorkUnit, json_keys, text_mode: str, parsed: ParsedUnit) -> None:
    data: bytes = unit.payload
    if text_mode == "file":
        try:
            docs = [(unit.first_line, _strip_bom(unit, 0, data).decode("utf-8"))]
        except UnicodeDecodeError as err:
            # One document per file: a bad byte spoils it; report the line it sits on.
            line = unit.first_line + data.count(b"\n", 0, err.start)
            _bad(parsed, line, "not_utf8", f"not valid UTF-8 (byte 0x{data[err.start]:02x})")
            return
    else:
        docs = []
        for offset, raw in enumerate(_lines(data)):
            line = unit.first_line + offset
            raw = _strip_bom(unit, offset, raw)
            if not raw or raw.isspace():  # no copy of the line, as strip() would make
                parsed.counts["blank_lines"] += 1
                continue
            try:
                docs.append((line, raw.decode("utf-8").removesuffix("\r")))
            except UnicodeDecodeError as err:
                _bad(parsed, line, "not_utf8", f"not valid UTF-8 (byte 0x{raw[err.start]:02x} "
                                               f"at column {err.start + 1})")
    for _line, doc in docs:
        parsed.counts["records"] += 1
        for key in json_keys:
            parsed.texts[key].append(doc)
