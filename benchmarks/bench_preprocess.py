"""Preprocessing speed: our tool against megatron-core's IndexedDatasetBuilder, same input and tokenizer.

The baseline is what each Megatron-LM ``tools/preprocess_data.py`` worker does, in one process:
``json.loads`` a line, ``encode_as_ids`` its text with sentencepiece, append EOD, and
``IndexedDatasetBuilder.add_document`` it. Ours runs as its console tool would
(``python -m megatron_tinyllama.data.preprocess --workers N``), timed from process start to exit.
Both read the same jsonl (distinct documents cut from this install's Python sources and docs; no
document repeats, so our per-word cache sees no more reuse than real text gives it) and use the
same Llama-style 32k sentencepiece model (trained here on the same material), and must write byte-identical
``.bin``/``.idx`` files, which is checked. Each side runs ``--repeats`` times and the best time
counts; the runs are interleaved so both sides see the same load (the machine may be shared).
Not a test: run by hand.

    python benchmarks/bench_preprocess.py --size-mb 40 --workers 2
"""

from __future__ import annotations

import argparse
import filecmp
import itertools
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_tinyllama.data.demo_corpus import code_documents, prose_documents  # noqa: E402
from megatron_tinyllama.data.indexed import token_dtype  # noqa: E402
from megatron_tinyllama.data.tokenizer import train_sentencepiece  # noqa: E402


def python_sources():
    """Every UTF-8 ``.py`` file of this install (standard library with its tests, then
    site-packages), in sorted path order: tens of MB of distinct code and docstrings."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(".py") and path.stat().st_size <= 400_000:
                try:
                    yield path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue


def web_like_documents():
    """Distinct docs of 1-6 kB cut at blank lines from the docs' prose and Python sources."""
    sources = itertools.chain((text for _, text in prose_documents()), python_sources())
    for n, text in enumerate(sources):
        target = 1000 + (n * 2654435761) % 5000
        start = 0
        while start < len(text):
            cut = text.find("\n\n", start + target)
            end = len(text) if cut < 0 else cut + 2
            if text[start:end].strip():
                yield text[start:end]
            start = end


def make_input(path: Path, size_mb: float) -> int:
    """Write a jsonl of about ``size_mb`` MB (SlimPajama-like records, no document repeated)."""
    if path.exists() and abs(path.stat().st_size / 2**20 - size_mb) < 1:
        return sum(1 for _ in open(path, "rb"))
    written = count = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for doc in web_like_documents():
            if written >= size_mb * 2**20:
                break
            line = json.dumps({"text": doc, "meta": {"redpajama_set_name": "RedPajamaC4"}})
            out.write(line + "\n")
            written += len(line) + 1
            count += 1
    if written < size_mb * 2**20:
        raise SystemExit(f"only {written / 2**20:.1f} MB of distinct text here; use a smaller --size-mb")
    os.replace(tmp, path)
    return count


def make_tokenizer(workdir: Path) -> Path:
    model = workdir / "llama32k.model"
    if not model.exists():
        texts = [text for _, text in prose_documents()]
        texts += [src for _, src in code_documents(max_total_bytes=12_000_000)]
        train_sentencepiece(texts, workdir / "llama32k", 32000)
    return model


def run_baseline(input_path: Path, model: Path, prefix: Path) -> tuple[float, int]:
    """One process, one document at a time into IndexedDatasetBuilder (Megatron-LM's per-worker loop)."""
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sp = spm.SentencePieceProcessor(model_file=str(model))
    eod = sp.eos_id()
    start = time.perf_counter()
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=token_dtype(sp.get_piece_size()).type)
    tokens = 0
    with open(input_path, encoding="utf-8") as stream:
        for line in stream:
            text = json.loads(line)["text"]
            ids = sp.encode_as_ids(text)
            if not ids:
                continue
            ids.append(eod)
            builder.add_document(ids, [len(ids)])
            tokens += len(ids)
    builder.finalize(f"{prefix}.idx")
    return time.perf_counter() - start, tokens


def run_ours(input_path: Path, model: Path, prefix: Path, workers: int,
             progress: bool = False) -> float:
    command = [sys.executable, "-m", "megatron_tinyllama.data.preprocess", "--input",
               str(input_path), "--output-prefix", f"{prefix}_{{key}}", "--tokenizer-model",
               str(model), "--append-eod", "--workers", str(workers)]
    if not progress:
        command.append("--quiet")
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_preprocess")
    parser.add_argument("--size-mb", type=float, default=40.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--progress", action="store_true",
                        help="run ours with its progress bar drawing (default: --quiet)")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = make_tokenizer(workdir)
    input_path = workdir / "input.jsonl"
    docs = make_input(input_path, args.size_mb)
    size = input_path.stat().st_size
    print(f"input: {input_path} ({size / 2**20:.1f} MB, {docs} docs); tokenizer: {model} "
          f"(32000 pieces); cpus: {os.cpu_count()}; load avg: {os.getloadavg()[0]:.2f}")

    # Interleave the runs so that both sides see the same load from other users of the machine.
    base_times, ours_times, tokens = [], {w: [] for w in args.workers}, 0
    for _ in range(args.repeats):
        seconds, tokens = run_baseline(input_path, model, workdir / "baseline")
        base_times.append(seconds)
        for workers in args.workers:
            ours_times[workers].append(run_ours(input_path, model, workdir / f"ours{workers}",
                                                workers, args.progress))
    base = min(base_times)
    print(f"megatron-core IndexedDatasetBuilder, 1 process: {tokens / base / 1e6:.3f} M tokens/s "
          f"(best of {[round(t, 2) for t in base_times]} s, {tokens} tokens)")
    for workers, times in ours_times.items():
        ours = min(times)
        same = all(filecmp.cmp(workdir / f"baseline.{ext}",
                               workdir / f"ours{workers}_text.{ext}", shallow=False)
                   for ext in ("bin", "idx"))
        print(f"tinyllama-preprocess-data --workers {workers}: {tokens / ours / 1e6:.3f} M tokens/s "
              f"(best of {[round(t, 2) for t in times]} s, wall time incl. start-up); "
              f"identical output: {same}")
        print(f"RATIO workers={workers}: {base / ours:.2f}x the single-process builder "
              f"(goal with 2 workers: >= 2x)")
    print(f"load avg after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
