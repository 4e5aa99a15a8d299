"""A small two-domain corpus built from the running Python install, for demos and benchmarks.

This module owns the demo data. Everything comes from files every CPython install ships and
that may be redistributed under the PSF licence, so no download is needed:

* natural language: the English prose of Python's documentation in ``pydoc_data.topics``
  (one document per topic, sorted by topic name);
* code: the standard library's ``.py`` sources (one document per file, in sorted path order,
  test suites and vendored trees left out, bounded in size per file and in total).

:func:`build_demo_corpus` writes both as jsonl, trains a Llama-style sentencepiece tokenizer on
them and preprocesses each into an indexed dataset. Each step is skipped when its output exists;
every output is written under a temporary name and renamed, so existing means complete.
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


@dataclass(frozen=True)
class DemoCorpus:
    """Paths of a built demo corpus.

    Attributes:
        text_jsonl: Prose documents, ``{"text": ..., "topic": ...}`` per line.
        code_jsonl: Code documents, ``{"code": ..., "path": ...}`` per line.
        tokenizer_model: sentencepiece model (unk=0, bos=1, eos=2; LlamaTokenizer-loadable).
        text_prefix: Indexed dataset of the prose (``<out>/text_document``).
        code_prefix: Indexed dataset of the code (``<out>/code_document``).
    """

    text_jsonl: Path
    code_jsonl: Path
    tokenizer_model: Path
    text_prefix: Path
    code_prefix: Path

    @property
    def blend(self) -> tuple[str, ...]:
        """The demo's 0.7 prose / 0.3 code blend, in ``DataConfig.blend`` form."""
        return ("0.7", str(self.text_prefix), "0.3", str(self.code_prefix))


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


def _write_jsonl(path: Path, records: Iterator[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


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
        Paths of everything built; ``corpus.blend`` is the 0.7/0.3 training blend.
    """
    from megatron_tinyllama.data.indexed import dataset_exists
    from megatron_tinyllama.data.preprocess import PreprocessConfig, preprocess_data
    from megatron_tinyllama.data.tokenizer import train_sentencepiece

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = DemoCorpus(out / "text.jsonl", out / "code.jsonl", out / "tokenizer.model",
                        out / "text_document", out / "code_document")
    if not corpus.text_jsonl.exists():
        _write_jsonl(corpus.text_jsonl,
                     ({"text": text, "topic": name} for name, text in prose_documents()))
    if not corpus.code_jsonl.exists():
        _write_jsonl(corpus.code_jsonl, ({"code": source, "path": rel}
                                         for rel, source in code_documents(max_code_bytes)))
    if not corpus.tokenizer_model.exists():
        tmp_prefix = out / f"tokenizer.tmp{os.getpid()}"
        train_sentencepiece(_training_texts(corpus), tmp_prefix, vocab_size)
        os.replace(f"{tmp_prefix}.vocab", out / "tokenizer.vocab")
        os.replace(f"{tmp_prefix}.model", corpus.tokenizer_model)
    for key, source in (("text", corpus.text_jsonl), ("code", corpus.code_jsonl)):
        if not dataset_exists(str(out / f"{key}_document")):
            preprocess_data(PreprocessConfig(
                inputs=(str(source),), output_prefix=str(out / "{key}_document"),
                tokenizer_model=str(corpus.tokenizer_model), json_keys=(key,),
                append_eod=True, workers=workers, progress=progress))
    return corpus


def _training_texts(corpus: DemoCorpus) -> Iterator[str]:
    for path, key in ((corpus.text_jsonl, "text"), (corpus.code_jsonl, "code")):
        with open(path, encoding="utf-8") as stream:
            for line in stream:
                yield json.loads(line)[key]
