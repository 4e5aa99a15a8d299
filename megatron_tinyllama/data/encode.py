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


class PlainEncoder:
    """One call into the tokenizer per batch."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all token ids back to back, int64 lengths per text); no BOS/EOS."""
        return _flatten(self.tokenizer.encode_batch(texts))


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
                 max_chars: int = 8_000_000) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        ok, reason = segment_cache_support(tokenizer)
        if not ok:
            raise ValueError(f"segment cache not exact for {tokenizer.path}: {reason}")
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self.max_chars = max_chars
        self.enabled = True
        self._first_sp = tokenizer._sp  # segments that start a document get the dummy prefix
        proto = model_pb2.ModelProto()
        with open(tokenizer.path, "rb") as stream:
            proto.ParseFromString(stream.read())
        proto.normalizer_spec.add_dummy_prefix = False
        self._rest_sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
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
                 max_entries: Optional[int] = None):
    """The fastest exact encoder for ``tokenizer``.

    Args:
        tokenizer: The tokenizer.
        segment_cache: Allow :class:`SegmentCacheEncoder` when it is exact for this model.
        max_entries: Its cache bound (default 65536 segments).
    """
    if segment_cache and segment_cache_support(tokenizer)[0]:
        bound = {"max_entries": max_entries} if max_entries else {}
        return SegmentCacheEncoder(tokenizer, **bound)
    return PlainEncoder(tokenizer)
