"""Concatenate indexed datasets into one: the ``tinyllama-merge-datasets`` tool.

This module owns merging partitioned outputs (e.g. one preprocessing job per input shard). Like
Megatron-LM's ``tools/merge_datasets.py`` it takes a directory of ``.bin/.idx`` pairs (merged in
sorted name order) and an output prefix; it also accepts explicit prefixes and globs. Inputs
written by megatron-core's builder (including several sequences per document) merge too.
Memory stays flat (``.bin`` files are copied in blocks, index arrays streamed), and the result
appears only when complete (see :class:`.indexed.IndexedDatasetWriter`). Inputs recorded as made
by different tokenizers are refused; the output records their tokenizer when all share one.
One dataset named twice (``./x`` and ``x``, through a symlink or as a byte-identical copy) is
refused naming both arguments: merging it would silently repeat every document.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron_tinyllama.data.indexed import (IndexedDatasetWriter, IndexFormatError, bin_path,
                                             dataset_exists, dataset_fingerprint, idx_path,
                                             read_index)
from megatron_tinyllama.data.outputs import OutputPathError
from megatron_tinyllama.data.provenance import (TokenizerRecord, dataset_meta,
                                                read_tokenizer_record)

_BLOCK = 1 << 20


class MergeError(ValueError):
    """Inputs that cannot be merged (missing halves, mixed dtypes or tokenizers, output among the
    inputs)."""


@dataclass(frozen=True)
class MergeSummary:
    output_prefix: str
    inputs: tuple[str, ...]
    documents: int
    sequences: int
    tokens: int
    tokenizer: Optional[TokenizerRecord]
    """The inputs' common tokenizer, recorded in the output; None when some input has no record."""
    unrecorded: tuple[str, ...] = ()
    """Inputs without a tokenizer record (megatron-core's builder, older datasets)."""


def resolve_prefixes(inputs: Sequence[str]) -> list[str]:
    """Dataset prefixes named by directories, prefixes, or globs of prefixes / ``.idx`` files.

    Raises:
        MergeError: Something names no dataset, a dataset lacks its ``.bin`` or ``.idx``, or
            one dataset is named twice (see :func:`check_distinct`).
    """
    named: list[tuple[str, str]] = []  # (prefix, the argument that named it)
    for item in inputs:
        if os.path.isdir(item):
            names = sorted(os.listdir(item))
            found = sorted({os.path.join(item, os.path.splitext(n)[0]) for n in names
                            if n.endswith((".idx", ".bin"))})
        elif dataset_exists(item):
            found = [item]
        else:
            base = item[:-4] if item.endswith((".idx", ".bin")) else item
            found = sorted({p[:-4] for p in glob.glob(base + ".idx") + glob.glob(base + ".bin")})
        if not found:
            raise MergeError(f"{item}: names no indexed dataset (.bin/.idx pair)")
        for prefix in found:
            for path in (idx_path(prefix), bin_path(prefix)):
                if not os.path.isfile(path):
                    raise MergeError(f"{path}: missing (each dataset needs .bin and .idx)")
        named.extend((prefix, item) for prefix in found)
    check_distinct(named)
    return [prefix for prefix, _ in named]


def check_distinct(named: Sequence[tuple[str, str]]) -> None:
    """Refuse a dataset that ``named`` (pairs of prefix and the ``--input`` naming it) lists twice.

    Twice means the same files (``x``, ``./x`` and ``/abs/x``, a symlink: equal resolved paths)
    or the same contents (a copy: equal :func:`.indexed.dataset_fingerprint`, the ``.idx`` digest
    the sample-index cache keys on, confirmed byte for byte on the ``.bin`` so that two shards
    whose documents merely have equal lengths still merge). Either way the merge would repeat
    every document of it without a word. Empty datasets add nothing and are not compared.

    Raises:
        MergeError: Naming both arguments and both prefixes.
    """
    by_path: dict[str, tuple[str, str]] = {}
    by_content: dict[str, list[tuple[str, str]]] = {}
    for prefix, item in named:
        where = (os.path.realpath(idx_path(prefix)), os.path.realpath(bin_path(prefix)))
        first = by_path.get(where[0]) or by_path.get(where[1])
        if first is not None:
            raise MergeError(_twice(first, (prefix, item), f"the same files ({where[0]})"))
        by_path[where[0]] = by_path[where[1]] = (prefix, item)
        if os.path.getsize(bin_path(prefix)) == 0:
            continue
        same_index = by_content.setdefault(dataset_fingerprint(prefix), [])
        for other in same_index:
            if _same_bytes(bin_path(other[0]), bin_path(prefix)):
                raise MergeError(_twice(other, (prefix, item), "byte-identical copies"))
        same_index.append((prefix, item))


def _twice(first: tuple[str, str], second: tuple[str, str], how: str) -> str:
    def arg(pair: tuple[str, str]) -> str:
        return pair[1] if pair[0] == pair[1] else f"{pair[1]} ({pair[0]})"
    return (f"--input {arg(second)} and --input {arg(first)} are one dataset, {how}: merging "
            f"would repeat each of its documents; name each dataset once")


def _same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as left, open(b, "rb") as right:
        while True:
            block = left.read(_BLOCK)
            if block != right.read(_BLOCK):
                return False
            if not block:
                return True


def merge_datasets(inputs: Sequence[str], output_prefix: str) -> MergeSummary:
    """Write the concatenation of the input datasets, in order, to ``output_prefix``.

    Args:
        inputs: Directories, prefixes or globs (see :func:`resolve_prefixes`).
        output_prefix: Where the merged ``.bin/.idx`` go.

    Returns:
        Counts of the merged dataset.

    Raises:
        MergeError: Bad inputs; IndexFormatError: an input index is corrupt.
    """
    prefixes = resolve_prefixes(inputs)
    out_abs = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out_abs for p in prefixes):
        raise MergeError(f"{output_prefix}: the output is also an input")
    infos = [read_index(prefix) for prefix in prefixes]
    dtypes = {str(info.dtype) for info in infos}
    if len(dtypes) != 1:
        raise MergeError(f"inputs mix token dtypes {sorted(dtypes)}; tokenize them alike")
    records = {prefix: read_tokenizer_record(prefix) for prefix in prefixes}
    known = [(prefix, record) for prefix, record in records.items() if record is not None]
    for prefix, record in known[1:]:
        if record.sha256 != known[0][1].sha256:
            raise MergeError(f"{prefix} was tokenized with {record.describe()}, but "
                             f"{known[0][0]} with {known[0][1].describe()}: token ids of "
                             f"different tokenizers mean different things; tokenize them alike")
    unrecorded = tuple(prefix for prefix, record in records.items() if record is None)
    common = known[0][1] if known and not unrecorded else None
    meta = dataset_meta(common) if common else None
    with IndexedDatasetWriter(output_prefix, infos[0].dtype, meta=meta) as writer:
        for info in infos:
            seq_offset = writer.num_sequences
            for start in range(0, info.num_sequences, _BLOCK):
                lengths = np.asarray(info.sequence_lengths[start:start + _BLOCK])
                writer.add_raw(lengths, np.zeros(0, np.int64), int(lengths.sum(dtype=np.int64)))
            ends = info.document_indices[1:]
            for start in range(0, ends.shape[0], _BLOCK):
                writer.add_raw(np.zeros(0, np.int32), seq_offset + ends[start:start + _BLOCK], 0)
            with open(bin_path(info.prefix), "rb") as source:
                shutil.copyfileobj(source, writer.bin_stream, _BLOCK)
    return MergeSummary(output_prefix, tuple(prefixes), writer.num_documents,
                        writer.num_sequences, writer.num_tokens, common, unrecorded)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="tinyllama-merge-datasets",
        description="Concatenate Megatron indexed datasets (.bin/.idx) into one.")
    parser.add_argument("--input", nargs="+", required=True,
                        help="directory of .bin/.idx pairs (sorted by name), prefixes, or globs")
    parser.add_argument("--output-prefix", required=True, help="merged dataset, without suffix")
    args = parser.parse_args(argv)
    try:
        summary = merge_datasets(args.input, args.output_prefix)
    except (MergeError, IndexFormatError, OutputPathError) as err:
        print(f"error: {err}", file=sys.stderr)
        print("error: nothing was written", file=sys.stderr)
        return 1
    print(f"merged {len(summary.inputs)} datasets -> {summary.output_prefix}: "
          f"{summary.documents} docs, {summary.sequences} sequences, {summary.tokens} tokens")
    if summary.tokenizer is not None:
        print(f"tokenizer: {summary.tokenizer.describe()}")
    else:
        print(f"tokenizer: not recorded ({len(summary.unrecorded)} of the inputs carry no "
              f"record, e.g. {summary.unrecorded[0]}); token ids are checked against the model "
              f"per sample at training time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
