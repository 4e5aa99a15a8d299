"""The demo corpus: built from the Python install, tokenizer included, idempotent."""

from __future__ import annotations

import json
import shutil

import numpy as np

from megatron_tinyllama.data.demo_corpus import VALID_EVERY, build_demo_corpus, prose_documents
from megatron_tinyllama.data.indexed import read_index
from megatron_tinyllama.data.tokenizer import load_tokenizer


def _stamps(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_demo_corpus_builds_two_datasets_and_a_llama_tokenizer_idempotently(tmp_path):
    out = tmp_path / "demo"
    corpus = build_demo_corpus(out)
    assert corpus.text_prefix == out / "text_document" and corpus.code_prefix == out / "code_document"
    assert corpus.blend == ("0.7", str(out / "text_document"), "0.3", str(out / "code_document"))

    tok = load_tokenizer(corpus.tokenizer_model)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (4096, 1, 2)
    from transformers import LlamaTokenizer

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(corpus.tokenizer_model, hf_dir / "tokenizer.model")
    hf = LlamaTokenizer.from_pretrained(str(hf_dir))
    assert hf.encode("def main(argv):", add_special_tokens=False) == tok.encode("def main(argv):")

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    text, code = read_index(str(corpus.text_prefix)), read_index(str(corpus.code_prefix))
    valid_text = read_index(str(corpus.valid_text_prefix))
    valid_code = read_index(str(corpus.valid_code_prefix))
    topics = [name for name, _ in prose_documents()]
    assert text.num_documents + valid_text.num_documents == len(topics) > 50
    assert valid_text.num_documents == len(topics[VALID_EVERY // 2::VALID_EVERY]) > 5
    assert code.num_documents > 100 and code.num_tokens > text.num_tokens
    assert code.num_documents > 8 * valid_code.num_documents > 0
    assert corpus.valid_blend == ("0.7", str(out / "valid_text_document"),
                                  "0.3", str(out / "valid_code_document"))
    # Held out means disjoint: no validation document is in the training jsonl (nor its tokenizer).
    train_topics = {json.loads(line)["topic"] for line in corpus.text_jsonl.read_text().splitlines()}
    valid_paths = {json.loads(line)["path"] for line in (out / "valid_code.jsonl").read_text().splitlines()}
    train_paths = {json.loads(line)["path"] for line in corpus.code_jsonl.read_text().splitlines()}
    assert train_topics.isdisjoint(topics[VALID_EVERY // 2::VALID_EVERY])
    assert train_paths.isdisjoint(valid_paths)
    for prefix in (corpus.text_prefix, corpus.code_prefix, corpus.valid_text_prefix,
                   corpus.valid_code_prefix):
        dataset = IndexedDataset(str(prefix))
        flat = np.concatenate([dataset[i] for i in range(len(dataset))])
        assert np.count_nonzero(flat == tok.eos_id) == len(dataset)  # once per document
        assert all(dataset[i][-1] == tok.eos_id for i in range(len(dataset)))

    stamps = _stamps(out)
    assert build_demo_corpus(out) == corpus and _stamps(out) == stamps  # nothing redone
    (out / "code_document.idx").unlink()
    build_demo_corpus(out)
    redone = {k for k, v in _stamps(out).items() if stamps.get(k) != v}
    assert redone == {"code_document.bin", "code_document.idx", "code_document.meta.json"}
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
