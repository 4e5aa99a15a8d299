"""A small two-domain corpus built from the running Python install, for demos and benchmarks.

This module owns the demo data. Everything comes from files every CPython install ships and
that may be redistributed under the PSF licence, so no download is needed:

* natural language: the English prose of Python's documentation in ``pydoc_data.topics``
  (one document per topic, sorted by topic name);
* code: the standard library's ``.py`` sources (one document per file, in sorted path order,
  test suites and vendored trees left out, bounded in size per file and in total).

:func:`build_demo_corpus` holds out every ``VALID_EVERY``-th document of each stream for
validation, writes the four parts as jsonl, trains a Llama-style sentencepiece tokenizer on the
training parts only and preprocesses each part into an indexed dataset. Each step is skipped when
its output exists; every output is written under a temporary name and renamed, so existing means
complete.
"""

from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

# Trees that are tests, data, or third-party: not representative "library code".
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "lib2to3", "turtledemo", "idlelib", "ensurepip", "encodings", "pydoc_data"}

VALID_EVERY = 10
"""Document ``i`` of a stream is held out for validation when ``i % VALID_EVERY == VALID_EVERY // 2``."""


@dataclass(frozen=True)
class DemoCorpus:
    """Paths of a built demo corpus.

    Attributes:
        text_jsonl: Prose documents for training, ``{"text": ..., "topic": ...}`` per line.
        code_jsonl: Code documents for training, ``{"code": ..., "path": ...}`` per line.
        tokenizer_model: sentencepiece model (unk=0, bos=1, eos=2; LlamaTokenizer-loadable),
            trained on the training documents only.
        text_prefix: Indexed dataset of the training prose (``<out>/text_document``).
        code_prefix: Indexed dataset of the training code (``<out>/code_document``).
        valid_text_prefix: Held-out prose (``<out>/valid_text_document``).
        valid_code_prefix: Held-out code (``<out>/valid_code_document``).
    """

    text_jsonl: Path
    code_jsonl: Path
    tokenizer_model: Path
    text_prefix: Path
    code_prefix: Path
    valid_text_prefix: Path
    valid_code_prefix: Path

    @property
    def blend(self) -> tuple[str, ...]:
        """The demo's 0.7 prose / 0.3 code blend, in ``DataConfig.blend`` form."""
        return ("0.7", str(self.text_prefix), "0.3", str(self.code_prefix))

    @property
    def valid_blend(self) -> tuple[str, ...]:
        """The same blend over the held-out documents (``DataConfig.valid_blend``)."""
        return ("0.7", str(self.valid_text_prefix), "0.3", str(self.valid_code_prefix))


def prose_documents() -> Iterator[tuple[str, str]]:
    """(topic, text) for every topic of Python's bundled documentation, sorted by topic."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if topics[name].strip():
            yield name, topics[name]


def code_documents(max_total_bytes: int = 3_000_000,
                   max_file_bytes: int = 60_000) -> Iterator[tuple[str, str]]:
    """(relative path, source) of standard-library modules, in sorted path order.

    Args:
        max_total_bytes: Stop once this many bytes of source have been yielded.
        max_file_bytes: Skip files larger than this (a few generated tables dominate otherwise).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                if path.stat().st_size > max_file_bytes:
                    continue
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if not source.strip():
                continue
            yield str(path.relative_to(root)), source
            total += len(source.encode("utf-8"))
            if total >= max_total_bytes:
                return


def is_held_out(index: int) -> bool:
    """Whether document ``index`` of a stream belongs to the validation part."""
    return index % VALID_EVERY == VALID_EVERY // 2


def _write_split_jsonl(train_path: Path, valid_path: Path, records: Iterator[dict]) -> None:
    """Write ``records`` to the training and held-out files; both appear together or not at all."""
    tmp_train = train_path.with_name(train_path.name + f".tmp{os.getpid()}")
    tmp_valid = valid_path.with_name(valid_path.name + f".tmp{os.getpid()}")
    with open(tmp_train, "w", encoding="utf-8") as train, \
            open(tmp_valid, "w", encoding="utf-8") as valid:
        for index, record in enumerate(records):
            out = valid if is_held_out(index) else train
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp_valid, valid_path)
    os.replace(tmp_train, train_path)  # last: an existing training file means both are complete


def build_demo_corpus(out_dir: Union[str, Path], *, vocab_size: int = 4096,
                      max_code_bytes: int = 3_000_000, workers: int = 1,
                      progress: bool = False) -> DemoCorpus:
    """Write the demo corpora, train their tokenizer and preprocess them (idempotent).

    Args:
        out_dir: Output folder (created).
        vocab_size: sentencepiece vocabulary size.
        max_code_bytes: Bound on the standard-library source included.
        workers: Preprocessing workers.
        progress: Show preprocessing progress lines.

    Returns:
        Paths of everything built; ``corpus.blend`` is the 0.7/0.3 training blend and
        ``corpus.valid_blend`` the same over the held-out documents.
    """
    from megatron_tinyllama.data.indexed import dataset_exists
    from megatron_tinyllama.data.preprocess import PreprocessConfig, preprocess_data
    from megatron_tinyllama.data.tokenizer import train_sentencepiece

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = DemoCorpus(out / "text.jsonl", out / "code.jsonl", out / "tokenizer.model",
                        out / "text_document", out / "code_document",
                        out / "valid_text_document", out / "valid_code_document")
    valid_jsonl = {"text": out / "valid_text.jsonl", "code": out / "valid_code.jsonl"}
    if not corpus.text_jsonl.exists():
        _write_split_jsonl(corpus.text_jsonl, valid_jsonl["text"],
                           ({"text": text, "topic": name} for name, text in prose_documents()))
    if not corpus.code_jsonl.exists():
        _write_split_jsonl(corpus.code_jsonl, valid_jsonl["code"],
                           ({"code": source, "path": rel}
                            for rel, source in code_documents(max_code_bytes)))
    if not corpus.tokenizer_model.exists():
        tmp_prefix = out / f"tokenizer.tmp{os.getpid()}"
        train_sentencepiece(_training_texts(corpus), tmp_prefix, vocab_size)
        os.replace(f"{tmp_prefix}.vocab", out / "tokenizer.vocab")
        os.replace(f"{tmp_prefix}.model", corpus.tokenizer_model)
    parts = [(key, source, "") for key, source in (("text", corpus.text_jsonl),
                                                   ("code", corpus.code_jsonl))]
    parts += [(key, source, "valid_") for key, source in valid_jsonl.items()]
    for key, source, split in parts:
        if not dataset_exists(str(out / f"{split}{key}_document")):
            preprocess_data(PreprocessConfig(
                inputs=(str(source),), output_prefix=str(out / f"{split}{{key}}_document"),
                tokenizer_model=str(corpus.tokenizer_model), json_keys=(key,),
                append_eod=True, workers=workers, progress=progress))
    return corpus


def _training_texts(corpus: DemoCorpus) -> Iterator[str]:
    for path, key in ((corpus.text_jsonl, "text"), (corpus.code_jsonl, "code")):
        with open(path, encoding="utf-8") as stream:
            for line in stream:
                yield json.loads(line)[key]
