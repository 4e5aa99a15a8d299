"""One huge document: encoded in pieces cut at segment boundaries, exactly as sentencepiece
encodes it whole, with peak memory bounded per piece instead of growing with the document
(a 220 MB document took 9.1 GB resident; issue 18 item 12)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megatron_tinyllama.data import preprocess as preprocess_module
from megatron_tinyllama.data.encode import LongDocumentEncoder, long_document_cuts, make_encoder
from megatron_tinyllama.data.preprocess import PreprocessConfig, preprocess_data
from megatron_tinyllama.data.tokenizer import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]


def _document(repeat: int = 1) -> str:
    """Prose and code with the cases a cut could get wrong: runs of spaces, tabs and newlines,
    indentation, a literal '▁', non-ASCII text, digits, and one long unspaced stretch."""
    import pydoc_data.topics

    topics = list(pydoc_data.topics.topics.values())
    parts = []
    for k in range(repeat):
        parts.extend(topics[k % 40 * 3: k % 40 * 3 + 3])
        parts.append("  \t  x = ▁▁ y  \n\n    def f(a,  b):\n\treturn a+b  # héllo wörld 12345\n")
        parts.append("abc" * (2000 if k == 0 else 1))  # no boundary for 6000 characters
    return "".join(parts)


def test_pieces_are_cut_only_at_segment_boundaries_and_equal_the_whole_encoding(llama_spm):
    tokenizer = load_tokenizer(llama_spm)
    text = _document(repeat=12)
    cuts = long_document_cuts(text, 2048)
    assert len(cuts) > 20 and cuts[0] == 0 and cuts == sorted(set(cuts))
    for cut in cuts[1:]:  # a space (or '▁') after a non-space
        assert text[cut] in " \u2581" and text[cut - 1] not in " \u2581"
    # The unspaced stretch stays whole: the first cut after it is past its end.
    stretch = text.index("abc" * 2000)
    assert not any(stretch < cut < stretch + 6000 for cut in cuts)

    whole = tokenizer.encode(text)  # sentencepiece on the whole string, no pieces
    assert LongDocumentEncoder(tokenizer, piece_chars=2048).encode(text).tolist() == whole
    for encoder in (make_encoder(tokenizer, long_document_chars=2048),
                    make_encoder(tokenizer, segment_cache=False, long_document_chars=2048)):
        short = ["short one", " another  one"]
        flat, lengths = encoder.encode([short[0], text, short[1]])
        expected = [tokenizer.encode(short[0]), whole, tokenizer.encode(short[1])]
        assert lengths.tolist() == [len(ids) for ids in expected]
        assert flat.tolist() == [i for ids in expected for i in ids]


def test_preprocess_writes_the_whole_document_encoding(tmp_path, llama_spm, monkeypatch):
    """Through the tool: the dataset holds sentencepiece's whole-document tokens plus EOS."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer = load_tokenizer(llama_spm)
    monkeypatch.setattr(preprocess_module, "make_encoder",
                        functools.partial(make_encoder, long_document_chars=4096))
    text = _document(repeat=4)
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "a short one"}) + "\n" + json.dumps({"text": text}) + "\n")
    summary = preprocess_data(PreprocessConfig(
        inputs=(str(path),), output_prefix=str(tmp_path / "out"), tokenizer_model=str(llama_spm),
        append_eod=True, progress=False))
    dataset = IndexedDataset(summary.outputs["text"])
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        tokenizer.encode("a short one") + [tokenizer.eos_id], tokenizer.encode(text) + [tokenizer.eos_id]]


_PEAK = textwrap.dedent("""
    import re, sys
    import numpy as np
    from megatron_tinyllama.data.encode import make_encoder
    from megatron_tinyllama.data.tokenizer import load_tokenizer
    from megatron_tinyllama.data.preprocess import tokenize_documents
    model, chars, whole = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "whole"
    tokenizer = load_tokenizer(model)
    encoder = make_encoder(tokenizer, long_document_chars=chars + 1 if whole else 1 << 18)
    words = [w for w in open(model.replace(".model", ".vocab"), encoding="utf-8").read().split()
             if not w.lstrip("-").replace(".", "").isdigit()]
    words = [w.replace("\\u2581", "") for w in words]
    rng = np.random.default_rng(0)
    # Built in blocks, so that making the text does not set a higher peak than encoding it.
    blocks, size = [], 0
    while size < chars:
        blocks.append(" ".join(words[i] for i in rng.integers(0, len(words), 4096)) + " ")
        size += len(blocks[-1])
    text = "".join(blocks)[:chars]
    del blocks
    tokenize_documents(encoder, ["warm up"], np.uint16, eos_id=2)

    def kib(field):
        return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

    before = kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
    flat, lengths, _ = tokenize_documents(encoder, [text], np.uint16, eos_id=2)
    print((kib("VmHWM") - before) * 1024, int(lengths[0]))
""")


def _peak_bytes(model, chars: int, mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _PEAK, str(model), str(chars), mode],
                         capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, check=True)
    added, tokens = out.stdout.split()
    return int(added), int(tokens)


def test_peak_memory_of_one_huge_document_is_bounded(llama_spm):
    """Peak resident memory added while tokenizing one 4 MB document (Linux VmHWM, restarted
    just before), whole (sentencepiece and Python's int lists over the whole string: ~100 bytes
    per token) against pieces. With pieces what remains is the output: int32 ids while pieces
    accumulate, their concatenation, the uint16 dataset tokens and two masks, <= 12 bytes per
    token, plus one piece's worth of sentencepiece."""
    chars = 4 << 20
    whole, whole_tokens = _peak_bytes(llama_spm, chars, "whole")
    pieces, tokens = _peak_bytes(llama_spm, chars, "pieces")
    assert tokens == whole_tokens > chars // 4
    print(f"peak RSS added per token: whole {whole / tokens:.1f} B, pieces {pieces / tokens:.1f} B")
    assert pieces / tokens <= 12 and pieces < whole / 5, (pieces / tokens, whole / tokens)
