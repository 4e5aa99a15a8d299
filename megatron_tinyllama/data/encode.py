"""Batches of documents -> one flat array of token ids plus per-document lengths, fast and exact.

This module owns the speed of tokenization in preprocessing (over 90% of its time). Two
encoders produce identical output:

* :class:`PlainEncoder` calls the tokenizer once per batch and flattens the result.
* :class:`SegmentCacheEncoder` memoises sentencepiece BPE per whitespace-delimited segment.
  Words repeat (Zipf), so most segments are dictionary hits and a batch becomes one numpy
  gather. It is exact because BPE merges never cross a segment boundary: a segment starts at a
  space (or ``▁``) that follows a non-space character, and a merge across that boundary would
  create a piece with ``▁`` after a non-``▁`` character, which a model trained without
  ``treat_whitespace_as_suffix`` cannot contain. :func:`segment_cache_support` checks that
  property on the model's vocabulary, plus identity normalisation, no whitespace collapsing, no
  user-defined symbols and the BPE model type (Llama's ``tokenizer.model`` passes); otherwise the
  plain encoder is used. Only the first segment of a document gets sentencepiece's dummy prefix,
  so it is cached separately. As a running check, one document per batch is also encoded
  plainly; any difference turns the cache off for the rest of the job (with a warning) and the
  batch is re-encoded plainly.

A document longer than :data:`LONG_DOCUMENT_CHARS` is encoded in pieces by either encoder
(:class:`LongDocumentEncoder`) when the same property holds: cut at segment boundaries, the first
piece with the dummy prefix and the others without, the pieces' tokens are exactly the whole
document's, and neither sentencepiece nor Python's lists of ints ever hold more than one piece
(a 220 MB document took 9.1 GB whole). Where the property does not hold (HF ``tokenizer.json``,
normalising sentencepiece models) no cut is provably exact, and long documents are encoded whole.
"""

from __future__ import annotations

import re
import warnings
from typing import Optional, Sequence

import numpy as np

from megatron_tinyllama.data.tokenizer import Tokenizer

_SPACE = "\u2581"  # sentencepiece's visible space
# Zero-width split before a run of spaces that follows a non-space character.
_SEGMENT_SPLIT = re.compile(f"(?<=[^ {_SPACE}])(?=[ {_SPACE}])")
_CROSSING_PIECE = re.compile(f"[^{_SPACE}]{_SPACE}")


def _flatten(encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    import itertools

    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64,
                       count=int(lengths.sum()))
    return flat, lengths


LONG_DOCUMENT_CHARS = 1 << 18
"""Documents longer than this (characters) are encoded piece by piece where that is exact.
sentencepiece holds about 100 bytes per character of the string it encodes; 256k characters
keep that to tens of MB, and a call per 256k characters costs nothing measurable."""
_BOUNDARY = re.compile(f"[^ {_SPACE}](?=[ {_SPACE}])")  # ends just before a segment boundary


def _without_dummy_prefix(tokenizer: Tokenizer):
    """The tokenizer's sentencepiece model, without the dummy prefix (for non-first segments)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    with open(tokenizer.path, "rb") as stream:
        proto.ParseFromString(stream.read())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def long_document_cuts(text: str, piece_chars: int) -> list[int]:
    """Start offsets of the pieces of ``text``: each at a segment boundary (a space after a
    non-space), about ``piece_chars`` apart. A stretch with no boundary (a long unspaced string)
    stays in one piece: only boundaries are exact cuts."""
    cuts, start = [0], 0
    while len(text) - start > piece_chars:
        target = start + piece_chars
        window = max(start + 1, target - piece_chars // 2)
        last = None
        for last in _BOUNDARY.finditer(text, window, target):
            pass
        if last is None:  # none in the second half of the piece: take the next one after it
            last = _BOUNDARY.search(text, target)
            if last is None:
                break
        start = last.end()
        cuts.append(start)
    return cuts


class LongDocumentEncoder:
    """Exact piecewise encoding of long documents (see the module docstring).

    Args:
        tokenizer: A sentencepiece tokenizer for which :func:`segment_cache_support` holds.
        piece_chars: Characters per piece (about).
    """

    def __init__(self, tokenizer: Tokenizer, piece_chars: int = LONG_DOCUMENT_CHARS) -> None:
        ok, reason = segment_cache_support(tokenizer)
        if not ok:
            raise ValueError(f"piecewise encoding not exact for {tokenizer.path}: {reason}")
        self.piece_chars = piece_chars
        self._first_sp = tokenizer._sp
        self._rest_sp = _without_dummy_prefix(tokenizer)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (int32: ids are below the vocabulary size, and this array is as
        long as the document), equal to encoding it whole; no BOS/EOS."""
        cuts = long_document_cuts(text, self.piece_chars)
        parts = []
        for k, start in enumerate(cuts):
            stop = cuts[k + 1] if k + 1 < len(cuts) else len(text)
            sp = self._first_sp if k == 0 else self._rest_sp
            parts.append(np.asarray(sp.encode(text[start:stop]), dtype=np.int32))
        return np.concatenate(parts) if parts else np.empty(0, np.int32)


def _with_long_documents(encode, long_encoder: Optional[LongDocumentEncoder],
                         texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``encode(texts)``, with documents over ``long_encoder.piece_chars`` encoded in pieces."""
    if long_encoder is None:
        return encode(texts)
    long_at = [i for i, text in enumerate(texts) if len(text) > long_encoder.piece_chars]
    if not long_at:
        return encode(texts)
    flats, lengths, start = [], [], 0
    for i in long_at + [len(texts)]:
        if start < i:
            flat, length = encode(texts[start:i])
            flats.append(flat)
            lengths.append(length)
        if i < len(texts):
            flats.append(long_encoder.encode(texts[i]))
            lengths.append(np.array([flats[-1].shape[0]], dtype=np.int64))
        start = i + 1
    if len(flats) == 1:  # a unit that is one long document: no copy
        return flats[0], lengths[0]
    return np.concatenate(flats), np.concatenate(lengths)


class PlainEncoder:
    """One call into the tokenizer per batch (long documents in exact pieces where possible)."""

    def __init__(self, tokenizer: Tokenizer,
                 long_encoder: Optional[LongDocumentEncoder] = None) -> None:
        self.tokenizer = tokenizer
        self.long_encoder = long_encoder

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all token ids back to back, int64 lengths per text); no BOS/EOS."""
        return _with_long_documents(lambda batch: _flatten(self.tokenizer.encode_batch(batch)),
                                    self.long_encoder, texts)


def segment_cache_support(tokenizer: Tokenizer) -> tuple[bool, str]:
    """Whether :class:`SegmentCacheEncoder` is exact for this tokenizer, and why not if not."""
    if tokenizer.kind != "sentencepiece":
        return False, "not a sentencepiece model"
    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError:  # needs protobuf
        return False, "sentencepiece_model_pb2 (protobuf) unavailable"
    proto = model_pb2.ModelProto()
    with open(tokenizer.path, "rb") as stream:
        proto.ParseFromString(stream.read())
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if trainer.model_type != model_pb2.TrainerSpec.BPE:
        return False, "not a BPE model"
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        return False, f"normalisation {norm.name!r} is not identity"
    if norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        return False, "whitespace is collapsed or not escaped"
    if trainer.treat_whitespace_as_suffix:
        return False, "treat_whitespace_as_suffix"
    for piece in proto.pieces:
        if piece.type == model_pb2.ModelProto.SentencePiece.USER_DEFINED:
            return False, f"user-defined symbol {piece.piece!r}"
        if _CROSSING_PIECE.search(piece.piece):
            return False, f"piece {piece.piece!r} has a space after a non-space"
    return True, ""


class SegmentCacheEncoder:
    """Exact, memoised sentencepiece BPE over whitespace-delimited segments (see module doc).

    Args:
        tokenizer: A sentencepiece tokenizer for which :func:`segment_cache_support` holds.
        max_entries: Cached segments kept before the cache is emptied (roughly 200 bytes each).
        max_chars: Characters of cached segments kept before the cache is emptied (a corpus of
            long unspaced strings, e.g. minified code, must not grow it without bound).
    """

    def __init__(self, tokenizer: Tokenizer, max_entries: int = 65_536,
                 max_chars: int = 8_000_000,
                 long_encoder: Optional[LongDocumentEncoder] = None) -> None:
        ok, reason = segment_cache_support(tokenizer)
        if not ok:
            raise ValueError(f"segment cache not exact for {tokenizer.path}: {reason}")
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self.max_chars = max_chars
        self.enabled = True
        self._first_sp = tokenizer._sp  # segments that start a document get the dummy prefix
        self._rest_sp = _without_dummy_prefix(tokenizer)
        self.long_encoder = long_encoder
        self._plain = PlainEncoder(tokenizer)
        self._checks = 0
        self._reset()

    def _reset(self) -> None:
        self._first: dict[str, int] = {}
        self._rest: dict[str, int] = {}
        self._buf = np.empty(1 << 16, dtype=np.int64)
        self._off = np.empty(1 << 12, dtype=np.int64)
        self._len = np.empty(1 << 12, dtype=np.int64)
        self._used = 0
        self._slots = 0
        self._chars = 0

    def _store(self, encoded: list[list[int]]) -> range:
        """Append encodings to the buffers; returns their slot numbers."""
        flat, lengths = _flatten(encoded)
        need_tokens = self._used + flat.shape[0]
        if need_tokens > self._buf.shape[0]:
            self._buf = np.resize(self._buf, max(need_tokens, 2 * self._buf.shape[0]))
        need_slots = self._slots + lengths.shape[0]
        if need_slots > self._off.shape[0]:
            size = max(need_slots, 2 * self._off.shape[0])
            self._off, self._len = np.resize(self._off, size), np.resize(self._len, size)
        self._buf[self._used:need_tokens] = flat
        starts = self._used + np.cumsum(lengths) - lengths
        self._off[self._slots:need_slots] = starts
        self._len[self._slots:need_slots] = lengths
        slots = range(self._slots, need_slots)
        self._used, self._slots = need_tokens, need_slots
        return slots

    def _lookup(self, keys: list[str], table: dict[str, int], sp) -> np.ndarray:
        slots = np.fromiter(map(table.get, keys, [-1] * len(keys)), dtype=np.int64,
                            count=len(keys))
        missing_at = np.flatnonzero(slots < 0)
        if missing_at.shape[0]:
            missing = list(dict.fromkeys(keys[i] for i in missing_at))
            self._chars += sum(map(len, missing))
            table.update(zip(missing, self._store(sp.encode(missing, num_threads=1))))
            slots[missing_at] = [table[keys[i]] for i in missing_at]
        return slots

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all token ids back to back, int64 lengths per text); no BOS/EOS."""
        return _with_long_documents(self._encode, self.long_encoder, texts)

    def _encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if not self.enabled or not texts:
            return self._plain.encode(texts)
        if len(self._first) + len(self._rest) > self.max_entries or self._chars > self.max_chars:
            self._reset()
        firsts, rest, per_doc = [], [], np.empty(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            segments = _SEGMENT_SPLIT.split(text)
            firsts.append(segments[0])
            rest.extend(segments[1:])
            per_doc[i] = len(segments)
        first_slots = self._lookup(firsts, self._first, self._first_sp)
        rest_slots = self._lookup(rest, self._rest, self._rest_sp)
        # Interleave: each document is its first segment, then its other segments.
        doc_starts = np.cumsum(per_doc) - per_doc
        slots = np.empty(int(per_doc.sum()), dtype=np.int64)
        is_first = np.zeros(slots.shape[0], dtype=bool)
        is_first[doc_starts] = True
        slots[is_first] = first_slots
        slots[~is_first] = rest_slots
        seg_len = self._len[slots]
        seg_end = np.cumsum(seg_len)
        gather = np.repeat(self._off[slots] - (seg_end - seg_len), seg_len)
        gather += np.arange(gather.shape[0], dtype=np.int64)
        flat = self._buf[gather]
        lengths = np.add.reduceat(seg_len, doc_starts) if len(texts) else seg_len
        if not self._check(texts, flat, lengths):
            return self._plain.encode(texts)
        return flat, lengths

    def _check(self, texts: Sequence[str], flat: np.ndarray, lengths: np.ndarray) -> bool:
        """Compare one document (a different one each batch) with plain encoding."""
        pick = self._checks % len(texts)
        self._checks += 1
        start = int(lengths[:pick].sum())
        expected = self.tokenizer.encode(texts[pick])
        if np.array_equal(flat[start:start + int(lengths[pick])], expected):
            return True
        self.enabled = False
        warnings.warn(f"segment-cached encoding differed from sentencepiece on a document; "
                      f"using plain encoding for the rest of this job ({self.tokenizer.path})")
        return False


def make_encoder(tokenizer: Tokenizer, *, segment_cache: bool = True,
                 max_entries: Optional[int] = None,
                 long_document_chars: int = LONG_DOCUMENT_CHARS):
    """The fastest exact encoder for ``tokenizer``, with bounded memory per long document where
    piecewise encoding is exact.

    Args:
        tokenizer: The tokenizer.
        segment_cache: Allow :class:`SegmentCacheEncoder` when it is exact for this model.
        max_entries: Its cache bound (default 65536 segments).
        long_document_chars: Documents longer than this are encoded in pieces of about this
            many characters (:class:`LongDocumentEncoder`), when that is exact.
    """
    exact_pieces = segment_cache_support(tokenizer)[0]
    long_encoder = LongDocumentEncoder(tokenizer, long_document_chars) if exact_pieces else None
    if segment_cache and exact_pieces:
        bound = {"max_entries": max_entries} if max_entries else {}
        return SegmentCacheEncoder(tokenizer, long_encoder=long_encoder, **bound)
    return PlainEncoder(tokenizer, long_encoder)
