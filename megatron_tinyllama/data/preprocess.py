"""Text -> Megatron indexed dataset: the ``tinyllama-preprocess-data`` tool and its Python API.

This module owns the preprocessing pipeline: the main process cuts the inputs into work units
(:mod:`.readers`) and writes results in input order (:mod:`.indexed`); ``--workers`` processes
parse, filter and tokenize units. At most ``2 * workers + 1`` units are in flight and lengths are
spilled to disk, so resident memory does not grow with the input (Megatron-LM's tool keeps all
lengths in lists and lets ``imap`` run ahead, and has run out of memory on large jsonl). The
output does not depend on the number of workers.

Documents are written exactly as tokenized, plus ``--bos`` before and ``--append-eod`` (EOS)
after each document, once: no filler, no padding. Empty (blank) documents are skipped and
counted; a job that is left with no document for an output writes nothing and fails. Each unit's
token counts are checked against these rules before it is written. Every output records the
tokenizer that made it (``<prefix>.meta.json``, :mod:`.provenance`).

Output names follow Megatron-LM: ``<output-prefix>_<key>_document`` per json key; a prefix
containing ``{key}`` is formatted instead (``out/{key}_document``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal, Optional, Sequence

import numpy as np
from tqdm import tqdm

from megatron_tinyllama.data.encode import PlainEncoder, make_encoder
from megatron_tinyllama.data.indexed import IndexedDatasetWriter, token_dtype
from megatron_tinyllama.data.outputs import OutputPathError
from megatron_tinyllama.data.provenance import dataset_meta, tokenizer_record
from megatron_tinyllama.data.readers import (BadInputError, WorkUnit, expand_inputs,
                                             iter_units, parse_unit)
from megatron_tinyllama.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer

def human(value: float, unit: str = "") -> str:
    """``1234567 -> '1.23M'`` as tqdm formats its own counters; small whole numbers as they are."""
    if value == int(value) and abs(value) < 1000:
        return f"{int(value)}{unit}"
    return tqdm.format_sizeof(value, unit, divisor=1000)


# SlimPajama marks its GitHub subset so; TinyLlama drops it (StarCoder already has the code).
SLIMPAJAMA_GITHUB = ("meta.redpajama_set_name", "RedPajamaGithub")
_MAX_EXAMPLES = 5


class EmptyOutputError(ValueError):
    """Every document for an output was empty, blank or filtered out: nothing to train on."""


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """One preprocessing job."""

    inputs: tuple[str, ...]
    """Files, globs or directories (searched recursively): jsonl[.zst], parquet, txt[.zst]."""
    output_prefix: str
    """Megatron-LM naming: ``<prefix>_<key>_document``; or a pattern with ``{key}``."""
    tokenizer_model: str
    """sentencepiece ``.model`` (Llama's in real use) or HF ``tokenizer.json``."""
    json_keys: tuple[str, ...] = ("text",)
    """Keys (jsonl) or columns (parquet) holding documents; one output dataset per key."""
    workers: int = 1
    """Tokenizer processes; 1 runs everything in this process."""
    append_eod: bool = False
    """Append the EOS id once at the end of every document."""
    bos: bool = False
    """Prepend the BOS id once at the start of every document."""
    exclude: tuple[tuple[str, str], ...] = ()
    """(dotted field, value): drop records whose field equals value."""
    skip_bad_lines: bool = False
    """Count and skip bad lines and zero-byte files instead of failing."""
    text_mode: Literal["file", "line"] = "file"
    """Plain-text inputs: one document per file, or per non-blank line."""
    chunk_bytes: int = 1 << 20
    """Input bytes per work unit (bounds memory: about 2 * workers + 1 units are held)."""
    segment_cache: bool = True
    """Memoise sentencepiece per whitespace segment where that is exact (see :mod:`.encode`)."""
    progress: bool = True
    """Show a progress bar (input bytes, documents and tokens per second) on stderr."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("no --input given")
        if self.workers < 1:
            raise ValueError("--workers must be >= 1")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError("--json-keys must be non-empty and distinct")
        if self.chunk_bytes < 1:
            raise ValueError("chunk_bytes must be >= 1")
        if self.text_mode not in ("file", "line"):
            raise ValueError(f"text_mode must be 'file' or 'line', not {self.text_mode!r}")


@dataclass
class PreprocessSummary:
    """What a job wrote and what it dropped."""

    outputs: dict[str, str]
    """Json key -> dataset prefix written."""
    documents: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    empty_documents: dict[str, int] = field(default_factory=dict)
    """Blank documents skipped, per key."""
    records: int = 0
    """Input records (lines, rows, text documents) that parsed."""
    filtered: int = 0
    """Records dropped by ``exclude``."""
    blank_lines: int = 0
    bad_lines: int = 0
    bad_line_reasons: dict[str, int] = field(default_factory=dict)
    bad_line_examples: list[str] = field(default_factory=list)
    """The first few skipped bad lines, as ``file:line: reason``."""
    bad_files: list[str] = field(default_factory=list)
    """Skipped files with the reason (zero-byte)."""
    files: int = 0
    input_bytes: int = 0
    seconds: float = 0.0

    def format(self) -> str:
        """Human-readable report, one fact per line."""
        secs = max(self.seconds, 1e-9)
        total_tokens = sum(self.tokens.values())
        lines = [f"files: {self.files} ({human(self.input_bytes, 'B')}) in {self.seconds:.1f} s"]
        for key, prefix in self.outputs.items():
            lines.append(f"[{key}] -> {prefix}: {self.documents.get(key, 0)} docs, "
                         f"{self.tokens.get(key, 0)} tokens, "
                         f"{self.empty_documents.get(key, 0)} empty docs skipped")
        lines.append(f"records: {self.records}, filtered out: {self.filtered}, "
                     f"blank lines: {self.blank_lines}")
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.bad_line_reasons.items()))
        lines.append(f"bad lines skipped: {self.bad_lines}" + (f" ({reasons})" if reasons else ""))
        lines.extend(f"  {entry}" for entry in self.bad_line_examples)
        lines.append(f"bad files skipped: {len(self.bad_files)}")
        lines.extend(f"  {entry}" for entry in self.bad_files)
        lines.append(f"throughput: {human(total_tokens / secs)} tokens/s, "
                     f"{human(self.records / secs)} docs/s, "
                     f"{human(self.input_bytes / secs, 'B')}/s")
        return "\n".join(lines)


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Dataset prefix for one json key (Megatron-LM naming unless ``{key}`` is given)."""
    if "{key}" in output_prefix:
        return output_prefix.replace("{key}", key)
    return f"{output_prefix}_{key}_document"


# ---------------------------------------------------------------------------------------------
# Worker side: parse + tokenize one unit. State is per process (set by _init_worker).


@dataclass
class _UnitResult:
    path: str
    nbytes: int
    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    counts: Counter
    errors: list[tuple[int, str]]


_STATE: dict = {}


def _init_worker(cfg: PreprocessConfig, dtype: np.dtype) -> None:
    tokenizer = load_tokenizer(cfg.tokenizer_model)
    _STATE.update(cfg=cfg, dtype=np.dtype(dtype),
                  encoder=make_encoder(tokenizer, segment_cache=cfg.segment_cache),
                  bos=tokenizer.bos_id if cfg.bos else None,
                  eos=tokenizer.eos_id if cfg.append_eod else None)


def _work(unit: WorkUnit) -> _UnitResult:
    cfg: PreprocessConfig = _STATE["cfg"]
    parsed = parse_unit(unit, cfg.json_keys, cfg.exclude, cfg.text_mode)
    result = _UnitResult(unit.path, unit.nbytes, {}, {}, parsed.counts, parsed.errors)
    if parsed.errors and not cfg.skip_bad_lines:
        return result  # the job stops at the first error: do not tokenize
    for key, texts in parsed.texts.items():
        tokens, lengths, empty = tokenize_documents(
            _STATE["encoder"], texts, _STATE["dtype"], bos_id=_STATE["bos"], eos_id=_STATE["eos"])
        result.tokens[key], result.lengths[key] = tokens, lengths
        result.counts[f"empty:{key}"] += empty
    return result


def tokenize_documents(encoder, texts: Sequence[str], dtype: np.dtype, *,
                       bos_id: Optional[int] = None, eos_id: Optional[int] = None
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """Tokenize documents into one flat array, with BOS/EOS once per document when given.

    Args:
        encoder: A :class:`Tokenizer`, or an encoder from :func:`.encode.make_encoder`.
        texts: Documents; blank ones (and ones that tokenize to nothing) are skipped.
        dtype: Output token dtype.
        bos_id: Prepended to every document when not None.
        eos_id: Appended to every document when not None.

    Returns:
        (tokens, int32 lengths per kept document, number of skipped empty documents).

    Raises:
        RuntimeError: The special-token counts break the once-per-document rule (a tokenizer
            emitting BOS/EOS from text), which would corrupt the dataset.
    """
    if isinstance(encoder, Tokenizer):
        encoder = PlainEncoder(encoder)
    # isspace, not strip: strip would copy every document (a 220 MB one included).
    keep = [text for text in texts if text and not text.isspace()]
    ids, body = encoder.encode(keep)
    if body.shape[0] and not body.all():  # nothing left after tokenizing: skip, do not write
        body = body[body > 0]
    empty = len(texts) - body.shape[0]
    extra = (bos_id is not None) + (eos_id is not None)
    lengths = body + extra
    ends = np.cumsum(lengths)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    if extra:
        starts = ends - lengths
        is_body = np.ones(flat.shape[0], dtype=bool)
        if bos_id is not None:
            flat[starts] = bos_id
            is_body[starts] = False
        if eos_id is not None:
            flat[ends - 1] = eos_id
            is_body[ends - 1] = False
        flat[is_body] = ids
    else:
        flat[:] = ids
    for special, name in ((bos_id, "BOS"), (eos_id, "EOS")):
        if special is not None and np.count_nonzero(flat == special) != body.shape[0]:
            raise RuntimeError(f"tokenizer produced {name} id {special} from text: refusing to "
                               f"write documents with extra special tokens")
    return flat, lengths.astype(np.int32), empty


def _ordered_map(fn: Callable, items: Iterable, workers: int, init: Callable,
                 init_args: tuple) -> Iterator:
    """``map(fn, items)`` in order over ``workers`` processes, with bounded read-ahead."""
    if workers <= 1:
        init(*init_args)
        for item in items:
            yield fn(item)
        return
    # fork, as Megatron-LM's tool: spawn would re-run an unguarded calling script in every
    # worker, and our workers need nothing from the parent but the config they are given.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers, initializer=init, initargs=init_args) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) > 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------
# Main side.


def preprocess_data(cfg: PreprocessConfig) -> PreprocessSummary:
    """Tokenize the inputs into one Megatron indexed dataset per json key.

    Args:
        cfg: The job.

    Returns:
        Counts of what was written and skipped.

    Raises:
        BadInputError: Bad input (file and line named) unless ``skip_bad_lines`` covers it;
            no output (not even a partial one) is left behind.
        TokenizerError: Unusable tokenizer, or EOS/BOS requested but missing.
        EmptyOutputError: No document is left for an output (all empty or filtered); nothing
            is written.
        OutputPathError: The output prefix's folder cannot be created (a file is in the way).
    """
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.tokenizer_model)
    if cfg.append_eod and tokenizer.eos_id is None:
        raise TokenizerError(f"{cfg.tokenizer_model}: --append-eod needs an EOS token; none found")
    if cfg.bos and tokenizer.bos_id is None:
        raise TokenizerError(f"{cfg.tokenizer_model}: --bos needs a BOS token; none found")
    files = expand_inputs(cfg.inputs)
    dtype = token_dtype(tokenizer.vocab_size)
    summary = PreprocessSummary({key: output_prefix_for(cfg.output_prefix, key)
                                 for key in cfg.json_keys}, files=len(files))
    total_bytes = sum(os.path.getsize(path) for path in files)
    progress = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                    desc="preprocess", disable=not cfg.progress, mininterval=0.5, smoothing=0.1)
    done_docs = done_tokens = done_bytes = 0
    counts: Counter = Counter()
    meta = dataset_meta(tokenizer_record(tokenizer))
    writers: dict[str, IndexedDatasetWriter] = {}
    try:
        for key, prefix in summary.outputs.items():
            writers[key] = IndexedDatasetWriter(prefix, dtype, meta=meta)
        units = _units(files, cfg, summary)
        for result in _ordered_map(_work, units, cfg.workers, _init_worker, (cfg, dtype)):
            if result.errors and not cfg.skip_bad_lines:
                line, message = result.errors[0]
                raise BadInputError(result.path, line, message, skippable=True)
            counts.update(result.counts)
            room = _MAX_EXAMPLES - len(summary.bad_line_examples)
            summary.bad_line_examples.extend(f"{result.path}:{line}: {message}"
                                             for line, message in result.errors[:max(0, room)])
            docs = tokens = 0
            for key, writer in writers.items():
                writer.add_documents(result.tokens[key], result.lengths[key])
                docs += len(result.lengths[key])
                tokens += int(result.tokens[key].shape[0])
            done_docs, done_tokens, done_bytes = (done_docs + docs, done_tokens + tokens,
                                                  done_bytes + result.nbytes)
            elapsed = max(time.perf_counter() - start, 1e-9)
            progress.set_postfix_str(f"{human(done_docs)} docs ({human(done_docs / elapsed)}/s), "
                                     f"{human(done_tokens)} tok ({human(done_tokens / elapsed)}/s)",
                                     refresh=False)
            progress.update(result.nbytes)
        for key, writer in writers.items():
            if writer.num_documents == 0:  # megatron-core's sampler would fail on it at train time
                raise EmptyOutputError(
                    f"{writer.prefix}: no document to write for key {key!r} "
                    f"({counts['records']} records read, {counts[f'empty:{key}']} empty, "
                    f"{counts['filtered']} filtered out, {counts['bad_lines']} bad lines skipped)")
        for writer in writers.values():
            writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        progress.close()
    for key, writer in writers.items():
        summary.documents[key] = writer.num_documents
        summary.tokens[key] = writer.num_tokens
        summary.empty_documents[key] = counts[f"empty:{key}"]
    summary.records = counts["records"]
    summary.filtered = counts["filtered"]
    summary.blank_lines = counts["blank_lines"]
    summary.bad_lines = counts["bad_lines"]
    summary.bad_line_reasons = {k[4:]: v for k, v in counts.items() if k.startswith("bad:")}
    summary.input_bytes = done_bytes
    summary.seconds = time.perf_counter() - start
    return summary


def _units(files: Sequence[str], cfg: PreprocessConfig,
           summary: PreprocessSummary) -> Iterator[WorkUnit]:
    filter_columns = [field_name.split(".")[0] for field_name, _ in cfg.exclude]
    for path in files:
        try:
            yield from iter_units(path, chunk_bytes=cfg.chunk_bytes, text_mode=cfg.text_mode,
                                  columns=cfg.json_keys, optional_columns=filter_columns)
        except BadInputError as err:
            if not (cfg.skip_bad_lines and err.skippable):
                raise
            summary.bad_files.append(str(err))


# ---------------------------------------------------------------------------------------------
# Command line.


def _parse_exclude(item: str) -> tuple[str, str]:
    field_name, sep, value = item.partition("=")
    if not sep or not field_name:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {item!r}")
    return field_name, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyllama-preprocess-data",
        description="Tokenize jsonl[.zst] / parquet / text into Megatron indexed datasets "
                    "(.bin/.idx) that megatron-core's IndexedDataset reads.")
    group = parser.add_argument_group("input")
    group.add_argument("--input", nargs="+", required=True,
                       help="files, globs or directories (recursive)")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys (jsonl) or columns (parquet) to tokenize; StarCoder: content")
    group.add_argument("--text-mode", choices=["file", "line"], default="file",
                       help="plain text: one document per file (default) or per line")
    group.add_argument("--exclude", type=_parse_exclude, action="append", default=[],
                       metavar="FIELD=VALUE", help="drop records whose (dotted) field equals "
                       "value, e.g. meta.redpajama_set_name=RedPajamaGithub; repeatable")
    group.add_argument("--exclude-slimpajama-github", action="store_true",
                       help="shorthand for --exclude meta.redpajama_set_name=RedPajamaGithub")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="count and skip malformed lines and zero-byte files instead of failing")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-model", required=True,
                       help="sentencepiece .model or HF tokenizer.json")
    group.add_argument("--tokenizer-type", default=None,
                       help="accepted for Megatron-LM command lines; the kind is read from "
                            "the file")
    group.add_argument("--append-eod", action="store_true", help="append EOS once per document")
    group.add_argument("--bos", action="store_true", help="prepend BOS once per document")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True,
                       help="writes <prefix>_<key>_document.{bin,idx}; '{key}' in it is replaced "
                            "instead")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=None,
                       help="accepted for Megatron-LM command lines; the progress bar redraws "
                            "twice a second")
    group.add_argument("--chunk-mb", type=float, default=1.0, help="input MB per work unit")
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    group.add_argument("--no-segment-cache", action="store_true",
                       help="call sentencepiece on whole documents (same output, slower)")
    return parser


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    exclude = list(args.exclude)
    if args.exclude_slimpajama_github:
        exclude.append(SLIMPAJAMA_GITHUB)
    return PreprocessConfig(
        inputs=tuple(args.input), output_prefix=args.output_prefix,
        tokenizer_model=args.tokenizer_model, json_keys=tuple(args.json_keys),
        workers=args.workers, append_eod=args.append_eod, bos=args.bos,
        exclude=tuple(exclude), skip_bad_lines=args.skip_bad_lines, text_mode=args.text_mode,
        chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))),
        segment_cache=not args.no_segment_cache, progress=not args.quiet)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 bad input, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    try:
        summary = preprocess_data(cfg)
    except (BadInputError, TokenizerError, EmptyOutputError, OutputPathError) as err:
        hint = getattr(err, "skippable", False) and not cfg.skip_bad_lines
        print(f"error: {err}", file=sys.stderr)
        print("error: nothing was written" + (" (--skip-bad-lines counts and skips such input)"
                                              if hint else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
