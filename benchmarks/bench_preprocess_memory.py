"""Preprocessing memory: peak resident memory stays flat as the input grows.

Runs ``python -m megatron_tinyllama.data.preprocess --workers 2`` on jsonl inputs of growing size
(many short documents, the case where per-document bookkeeping adds up; the smallest input is
past the workers' warm-up, when their bounded per-word cache has filled) and samples the
resident set size (RSS) of the whole process tree (main process + workers) every 50 ms with
psutil. For contrast, a Megatron-LM-style single process feeding megatron-core's
``IndexedDatasetBuilder`` (which keeps every length in Python lists until ``finalize``) runs on
the same inputs. Not a test: run by hand.

    python benchmarks/bench_preprocess_memory.py --sizes-mb 20 40 80 160

``--huge-doc-mb 50`` instead measures one jsonl line holding a single document of that size
(stdlib sources back to back): the peak RSS per document, as a multiple of the document's size.

    python benchmarks/bench_preprocess_memory.py --huge-doc-mb 50 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_tinyllama.data.demo_corpus import prose_documents  # noqa: E402
from megatron_tinyllama.data.tokenizer import train_sentencepiece  # noqa: E402


def short_documents():
    """Distinct documents of 100-600 bytes: groups of lines from this install's Python sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                lines = (Path(dirpath) / name).read_text(encoding="utf-8").splitlines(keepends=True)
            except (UnicodeDecodeError, OSError):
                continue
            doc = ""
            for line in lines:
                doc += line
                if len(doc) >= 100 + (n * 7919) % 500:
                    yield doc
                    doc, n = "", n + 1


def make_inputs(workdir: Path, sizes_mb: list[float]) -> list[Path]:
    paths = [workdir / f"input_{size:g}mb.jsonl" for size in sizes_mb]
    if all(p.exists() for p in paths):
        return paths
    for path, size in zip(paths, sizes_mb):
        written = 0
        with open(path, "w", encoding="utf-8") as out:
            for doc in short_documents():  # no document repeats within a file
                line = json.dumps({"text": doc}) + "\n"
                out.write(line)
                written += len(line)
                if written >= size * 2**20:
                    break
        if written < size * 2**20:
            raise SystemExit("not enough distinct text in this install for these sizes")
    return paths


def peak_rss(command: list[str]) -> tuple[float, float, float]:
    """(peak RSS of the process tree in MiB, peak of the main process in MiB, seconds)."""
    start = time.perf_counter()
    proc = psutil.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
    tree_peak = main_peak = 0
    while proc.poll() is None:
        try:
            main = proc.memory_info().rss
            children = sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            continue
        tree_peak, main_peak = max(tree_peak, main + children), max(main_peak, main)
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"{command} failed with {proc.returncode}")
    return tree_peak / 2**20, main_peak / 2**20, time.perf_counter() - start


BASELINE = """
import json, sys, numpy, sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
src, model, prefix = sys.argv[1:4]
sp = spm.SentencePieceProcessor(model_file=model)
builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
for line in open(src, encoding="utf-8"):
    ids = sp.encode_as_ids(json.loads(line)["text"]) + [sp.eos_id()]
    builder.add_document(ids, [len(ids)])
builder.finalize(prefix + ".idx")
"""


def make_huge_document(workdir: Path, size_mb: float) -> Path:
    """One jsonl line whose "text" is ``size_mb`` MB of distinct source text."""
    path = workdir / f"huge_{size_mb:g}mb.jsonl"
    if path.exists():
        return path
    parts, total = [], 0
    for doc in short_documents():
        parts.append(doc)
        total += len(doc)
        if total >= size_mb * 2**20:
            break
    path.write_text(json.dumps({"text": "".join(parts)}) + "\n", encoding="utf-8")
    return path


def huge_document(workdir: Path, model: Path, size_mb: float, workers: int) -> None:
    path = make_huge_document(workdir, size_mb)
    tree, main_peak, seconds = peak_rss([
        sys.executable, "-m", "megatron_tinyllama.data.preprocess", "--input", str(path),
        "--output-prefix", str(workdir / "huge"), "--tokenizer-model", str(model), "--append-eod",
        "--workers", str(workers), "--quiet"])
    size = path.stat().st_size / 2**20
    print(f"one {size:.0f} MiB document, {workers} worker(s): peak RSS {tree:.0f} MiB "
          f"(main {main_peak:.0f} MiB) = x{tree / size:.1f} the document, {seconds:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_preprocess_memory")
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[20, 40, 80, 160])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--huge-doc-mb", type=float,
                        help="measure one document of this size instead of the size sweep")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "llama32k.model"
    if not model.exists():
        texts = [text for _, text in prose_documents()]
        texts += [doc for doc, _ in zip(short_documents(), range(60_000))]
        train_sentencepiece(texts, workdir / "llama32k", 32000)
    if args.huge_doc_mb:
        huge_document(workdir, model, args.huge_doc_mb, args.workers)
        return
    inputs = make_inputs(workdir, args.sizes_mb)

    print(f"{'input':>10} {'docs':>9} | {'ours: tree peak':>15} {'main':>7} {'time':>6} | "
          f"{'megatron builder peak':>21} {'time':>6}")
    ours_peaks = []
    for path, size in zip(inputs, args.sizes_mb):
        docs = sum(1 for _ in open(path, "rb"))
        ours = peak_rss([sys.executable, "-m", "megatron_tinyllama.data.preprocess", "--input",
                         str(path), "--output-prefix", str(workdir / "ours"), "--tokenizer-model",
                         str(model), "--append-eod", "--workers", str(args.workers), "--quiet"])
        ours_peaks.append(ours[0])
        base = "" if args.no_baseline else "{:>18.0f} MiB {:>5.1f}s".format(*(lambda r: (r[0], r[2]))(
            peak_rss([sys.executable, "-c", BASELINE, str(path), str(model), str(workdir / "base")])))
        print(f"{size:>8g}MB {docs:>9} | {ours[0]:>11.0f} MiB {ours[1]:>3.0f} MiB {ours[2]:>5.1f}s | {base}")
    growth = ours_peaks[-1] / ours_peaks[0]
    print(f"ours: peak RSS x{growth:.2f} for x{args.sizes_mb[-1] / args.sizes_mb[0]:g} input "
          f"({'flat' if growth < 1.15 else 'NOT flat'}: goal < x1.15)")


if __name__ == "__main__":
    main()
