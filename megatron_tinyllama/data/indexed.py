"""Megatron's indexed dataset format (``.bin`` + ``.idx``), written and read with bounded memory.

This module owns the on-disk format that megatron-core's ``IndexedDataset`` reads:

* ``<prefix>.bin``: the tokens of every sequence back to back, in the dtype the index names.
* ``<prefix>.idx``: ``b"MMIDIDX\\x00\\x00"``, version ``<Q`` 1, dtype code ``<B``, sequence count
  ``<Q``, document count ``<Q``, then int32 sequence lengths, int64 byte pointers and int64
  document indices (sequence index where each document ends, starting with 0).

Next to them we may write ``<prefix>.meta.json``, a record of how the dataset was made (the
tokenizer, see :mod:`.provenance`) together with the dataset's fingerprint; megatron-core never
reads it, and a record whose fingerprint no longer matches the files (another tool rewrote them)
is ignored with a warning.

We write it ourselves instead of using megatron-core's ``IndexedDatasetBuilder`` because that
builder keeps every length in Python lists until ``finalize`` (memory grows with the corpus) and
writes straight to the final names. :class:`IndexedDatasetWriter` spills lengths to a side file,
writes under temporary names and renames only when both files are complete and consistent, so an
interrupted run never leaves a dataset that looks finished. :func:`read_index` reads ours and
megatron-core's files (the merge tool and tests use it); megatron-core reads ours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from megatron_tinyllama.data.outputs import (make_parent, open_temporaries,
                                             remove_stale_temporaries, temporary_tag)

logger = logging.getLogger(__name__)

INDEX_HEADER = b"MMIDIDX\x00\x00"
META_FORMAT = "megatron-tinyllama dataset record"
_HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype code, two counts
# megatron-core's DType enum (indexed_dataset.py); the codes are part of the file format.
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
_COPY_ITEMS = 1 << 20  # elements per block when streaming index arrays


class IndexFormatError(ValueError):
    """An ``.idx``/``.bin`` pair that is not a valid (or not a supported) indexed dataset."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Storage dtype for token ids: uint16 when the vocabulary fits, else int32.

    Same threshold as megatron-core's ``DType.optimal_dtype`` (cardinality < 65500).
    """
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def idx_path(prefix: str) -> str:
    return f"{prefix}.idx"


def bin_path(prefix: str) -> str:
    return f"{prefix}.bin"


def meta_path(prefix: str) -> str:
    return f"{prefix}.meta.json"


def dataset_exists(prefix: str) -> bool:
    """True when both files of a finished dataset are present."""
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


_FINGERPRINTS: dict[tuple, str] = {}


def dataset_fingerprint(prefix: str) -> str:
    """What identifies a dataset's contents: the SHA-256 of its ``.idx`` bytes and the ``.bin`` size.

    The index holds every sequence length and document boundary, so any re-preprocessing that
    could change a sample index changes it; paths and modification times do not enter (a copied
    dataset keeps its fingerprint, a rewritten one in the same place gets a new one). Memoised per
    process by the files' inode, size and mtime: reading a multi-GB ``.idx`` once is enough.
    """
    key = _version(prefix)
    if key not in _FINGERPRINTS:
        with open(idx_path(prefix), "rb") as stream:
            digest = hashlib.file_digest(stream, "sha256").hexdigest()
        _FINGERPRINTS[key] = _fingerprint(digest, os.path.getsize(bin_path(prefix)))
    return _FINGERPRINTS[key]


def _fingerprint(idx_sha256: str, bin_bytes: int) -> str:
    return f"{idx_sha256}-{bin_bytes}"


def _version(prefix: str) -> tuple:
    """The files' identity on disk: a rewrite (a rename over them, or new bytes) changes it."""
    return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns)
                 for s in (os.stat(idx_path(prefix)), os.stat(bin_path(prefix))))


def read_meta(prefix: str) -> Optional[dict[str, Any]]:
    """The record written beside a dataset (see the module docstring), or None.

    None when there is no record (megatron-core's builder, older datasets) or when it is stale:
    its fingerprint is not the files' (they were rewritten by a tool that left it behind), which
    is logged as a warning.

    Raises:
        IndexFormatError: The record exists but is not one of ours (not JSON, wrong format).
    """
    path = meta_path(prefix)
    try:
        with open(path, encoding="utf-8") as stream:
            record = json.load(stream)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise IndexFormatError(f"{path}: unreadable dataset record ({err})") from None
    if not isinstance(record, dict) or record.get("format") != META_FORMAT:
        raise IndexFormatError(f"{path}: not a dataset record (format is not {META_FORMAT!r})")
    if record.get("fingerprint") != dataset_fingerprint(prefix):
        logger.warning("%s: ignored, it describes other contents than %s.{bin,idx} (rewritten "
                       "since by another tool?)", path, prefix)
        return None
    return record


@dataclass(frozen=True)
class IndexInfo:
    """A memory-mapped view of an ``.idx`` file.

    Attributes:
        prefix: Dataset prefix (without ``.bin``/``.idx``).
        dtype: Token dtype of the ``.bin`` file.
        sequence_lengths: int32 tokens per sequence (one sequence per document when we write).
        sequence_pointers: int64 byte offset of each sequence in the ``.bin`` file.
        document_indices: int64 sequence index at which each document ends, starting with 0.
    """

    prefix: str
    dtype: np.dtype
    sequence_lengths: np.ndarray
    sequence_pointers: np.ndarray
    document_indices: np.ndarray

    @property
    def num_sequences(self) -> int:
        return int(self.sequence_lengths.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        total = 0
        for start in range(0, self.num_sequences, _COPY_ITEMS):
            total += int(self.sequence_lengths[start:start + _COPY_ITEMS].sum(dtype=np.int64))
        return total


def read_index(prefix: str) -> IndexInfo:
    """Open ``<prefix>.idx`` (ours or megatron-core's) and check it against ``<prefix>.bin``.

    megatron-core reads each sequence at the byte its pointer names and trusts the document
    indices, so an index that disagrees with itself trains on the wrong bytes (or crashes the
    sample-index builder). Every array is therefore checked, streamed in blocks, once per process
    and file version: lengths are >= 0, each pointer is the sum of the lengths before it times
    the token size, the last sequence ends at the ``.bin`` size, and document indices start at 0,
    never decrease and end at the sequence count.

    Args:
        prefix: Dataset prefix.

    Returns:
        Memory-mapped index arrays.

    Raises:
        IndexFormatError: Bad magic/version/dtype, a truncated file, multimodal modes (not
            supported), or arrays that disagree with each other or with the ``.bin`` size; the
            message names the ``.idx`` and the first bad entry.
    """
    path = idx_path(prefix)
    with open(path, "rb") as stream:
        head = stream.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[: len(INDEX_HEADER)] != INDEX_HEADER:
        raise IndexFormatError(f"{path}: not a Megatron indexed dataset index (bad header)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[len(INDEX_HEADER):])
    if version != 1:
        raise IndexFormatError(f"{path}: unsupported index version {version}")
    if code not in DTYPE_CODES:
        raise IndexFormatError(f"{path}: unknown dtype code {code}")
    expected = _HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
    actual = os.path.getsize(path)
    if actual == expected + n_seq and n_seq:
        raise IndexFormatError(f"{path}: multimodal datasets (sequence modes) are not supported")
    if actual != expected:
        raise IndexFormatError(f"{path}: {actual} bytes, expected {expected} for {n_seq} sequences")
    mm = np.memmap(path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=_HEADER_BYTES)
    pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=_HEADER_BYTES + 4 * n_seq)
    docs = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=_HEADER_BYTES + 12 * n_seq)
    info = IndexInfo(prefix, np.dtype(DTYPE_CODES[code]), lengths, pointers, docs)
    key = _version(prefix)
    if key not in _CHECKED_INDEXES:
        _check_index(info)
        _CHECKED_INDEXES.add(key)
    return info


_CHECKED_INDEXES: set[tuple] = set()


def _check_index(info: IndexInfo) -> None:
    path, itemsize = idx_path(info.prefix), info.dtype.itemsize
    offset = 0  # bytes of the .bin before the current block
    for start in range(0, info.num_sequences, _COPY_ITEMS):
        lengths = np.asarray(info.sequence_lengths[start:start + _COPY_ITEMS], dtype=np.int64)
        negative = np.flatnonzero(lengths < 0)
        if negative.size:
            k = int(negative[0])
            raise IndexFormatError(f"{path}: sequence {start + k} has length {lengths[k]}")
        nbytes = lengths * itemsize
        expected = offset + np.cumsum(nbytes) - nbytes
        actual = info.sequence_pointers[start:start + _COPY_ITEMS]
        wrong = np.flatnonzero(actual != expected)
        if wrong.size:
            k = int(wrong[0])
            raise IndexFormatError(
                f"{path}: sequence {start + k} starts at byte {actual[k]}, but the lengths before "
                f"it put it at byte {expected[k]} (corrupt or hand-edited index)")
        offset = int(expected[-1] + nbytes[-1])
    bin_size = os.path.getsize(bin_path(info.prefix))
    if offset != bin_size:
        raise IndexFormatError(f"{path}: index lists {offset // itemsize} tokens but "
                               f"{bin_path(info.prefix)} holds {bin_size // itemsize}")
    docs = info.document_indices
    if docs.shape[0] == 0 or docs[0] != 0:
        raise IndexFormatError(f"{path}: document indices must start with 0")
    previous = 0
    for start in range(0, docs.shape[0], _COPY_ITEMS):
        block = np.asarray(docs[start:start + _COPY_ITEMS])
        steps = np.diff(block, prepend=previous)
        down = np.flatnonzero(steps < 0)
        if down.size:
            k = start + int(down[0])
            raise IndexFormatError(f"{path}: document indices decrease at entry {k} "
                                   f"({docs[k]} after {docs[k - 1]})")
        previous = block[-1]
    if docs[-1] != info.num_sequences:
        raise IndexFormatError(f"{path}: last document ends at sequence {docs[-1]}, not "
                               f"{info.num_sequences} (the sequence count)")


class IndexedDatasetWriter:
    """Streams documents into ``<prefix>.bin/.idx`` through temporary files.

    Memory stays flat: tokens go straight to the ``.bin`` temp file, and lengths and document
    ends to side files that :meth:`finalize` streams into the ``.idx``. Nothing carries the final
    names until :meth:`finalize` has checked that the lengths sum to the ``.bin`` token count.
    Use as a context manager: an exception inside the block calls :meth:`abort`. Temporary names
    end in :func:`.outputs.temporary_tag`; those of a killed writer are removed by the next one.

    Args:
        prefix: Output prefix.
        dtype: Token dtype (see :func:`token_dtype`).
        meta: When given, written as ``<prefix>.meta.json`` with the dataset's fingerprint (and
            renamed into place with the other two); an old record is removed either way.
    """

    def __init__(self, prefix: str, dtype: np.dtype,
                 meta: Optional[dict[str, Any]] = None) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.meta = meta
        if self.dtype not in _CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no indexed-dataset code")
        make_parent(prefix)
        remove_stale_temporaries([bin_path(prefix), idx_path(prefix), f"{prefix}.lengths",
                                  f"{prefix}.docs", meta_path(prefix)])
        tag = temporary_tag()
        self._bin_tmp = bin_path(prefix) + tag
        self._idx_tmp = idx_path(prefix) + tag
        self._len_tmp = f"{prefix}.lengths{tag}"
        self._doc_tmp = f"{prefix}.docs{tag}"
        self._meta_tmp = meta_path(prefix) + tag
        self._bin, self._lengths, self._docs = open_temporaries(
            prefix, [self._bin_tmp, self._len_tmp, self._doc_tmp])
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self._closed = False

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents, each one sequence.

        Args:
            tokens: All their tokens back to back (cast to the dataset dtype).
            lengths: Tokens per document; must sum to ``len(tokens)``.
        """
        lengths = np.asarray(lengths, dtype=np.int32)
        ends = self.num_sequences + 1 + np.arange(lengths.shape[0], dtype=np.int64)
        self.add_sequences(tokens, lengths, ends)

    def add_sequences(self, tokens: np.ndarray, lengths: np.ndarray,
                      document_ends: np.ndarray) -> None:
        """Append sequences and the document boundaries among them (the merge path).

        Args:
            tokens: All their tokens back to back.
            lengths: Tokens per sequence.
            document_ends: Absolute sequence index at which each new document ends.
        """
        tokens = np.asarray(tokens)
        if tokens.dtype != self.dtype:
            tokens = tokens.astype(self.dtype)
        lengths = np.asarray(lengths, dtype=np.int32)
        total = int(lengths.sum(dtype=np.int64))
        if total != tokens.shape[0]:
            raise ValueError(f"lengths sum to {total} but {tokens.shape[0]} tokens were given")
        self._bin.write(tokens.tobytes())
        self.add_raw(lengths, np.asarray(document_ends, dtype=np.int64), total)

    def add_raw(self, lengths: np.ndarray, document_ends: np.ndarray, num_tokens: int) -> None:
        """Record sequences whose tokens the caller already wrote through :meth:`bin_stream`."""
        self._lengths.write(np.ascontiguousarray(lengths, dtype=np.int32).tobytes())
        self._docs.write(np.ascontiguousarray(document_ends, dtype=np.int64).tobytes())
        self.num_sequences += int(lengths.shape[0])
        self.num_documents += int(document_ends.shape[0])
        self.num_tokens += int(num_tokens)

    @property
    def bin_stream(self):
        """The open ``.bin`` temp file, for callers copying token bytes in bulk (merging)."""
        return self._bin

    def finalize(self) -> None:
        """Write the ``.idx``, check consistency, and move both files to their final names."""
        self._bin.close()
        self._lengths.close()
        self._docs.close()
        bin_bytes = os.path.getsize(self._bin_tmp)
        if bin_bytes != self.num_tokens * self.dtype.itemsize:
            self.abort()
            raise IndexFormatError(f"{self.prefix}: .bin has {bin_bytes} bytes, index expects "
                                   f"{self.num_tokens} tokens of {self.dtype}")
        fingerprint = _fingerprint(self._write_index(), bin_bytes)
        if self.meta is not None:
            with open(self._meta_tmp, "w", encoding="utf-8") as out:
                json.dump({"format": META_FORMAT, "fingerprint": fingerprint, **self.meta}, out,
                          indent=2)
        # An old .idx (or record) next to a new .bin would look complete: drop them before the
        # first rename. A kill between the renames leaves at worst a dataset without a record.
        self._cleanup(idx_path(self.prefix), meta_path(self.prefix))
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(self._idx_tmp, idx_path(self.prefix))
        if self.meta is not None:
            os.replace(self._meta_tmp, meta_path(self.prefix))
        self._cleanup(self._len_tmp, self._doc_tmp)
        _FINGERPRINTS[_version(self.prefix)] = fingerprint  # saves reading it back
        self._closed = True

    def _write_index(self) -> str:
        """Write the ``.idx`` temp file; returns the SHA-256 of its bytes."""
        itemsize = np.int64(self.dtype.itemsize)
        digest = hashlib.sha256()
        with open(self._idx_tmp, "wb") as out:
            def put(data: bytes) -> None:
                out.write(data)
                digest.update(data)

            put(INDEX_HEADER)
            put(struct.pack("<QBQQ", 1, _CODE_OF[self.dtype], self.num_sequences,
                            self.num_documents + 1))
            lengths = np.memmap(self._len_tmp, dtype=np.int32, mode="r") if self.num_sequences \
                else np.zeros(0, np.int32)
            for start in range(0, self.num_sequences, _COPY_ITEMS):
                put(np.asarray(lengths[start:start + _COPY_ITEMS]).tobytes())
            offset = np.int64(0)
            for start in range(0, self.num_sequences, _COPY_ITEMS):
                block = np.asarray(lengths[start:start + _COPY_ITEMS], dtype=np.int64) * itemsize
                ends = np.cumsum(block) + offset
                put((ends - block).tobytes())
                offset = ends[-1]
            put(np.zeros(1, np.int64).tobytes())
            with open(self._doc_tmp, "rb") as docs:
                while chunk := docs.read(8 * _COPY_ITEMS):
                    put(chunk)
            del lengths
        return digest.hexdigest()

    def abort(self) -> None:
        """Close and delete every temporary file; the final names are left untouched."""
        if self._closed:
            return
        for stream in (self._bin, self._lengths, self._docs):
            stream.close()
        self._cleanup(self._bin_tmp, self._idx_tmp, self._len_tmp, self._doc_tmp,
                      self._meta_tmp)
        self._closed = True

    @staticmethod
    def _cleanup(*paths: str) -> None:
        for path in paths:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> Optional[bool]:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()
        return None
