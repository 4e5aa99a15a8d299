"""Preprocessing: formats, special tokens, filters, determinism, and megatron-core compatibility."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

import numpy as np
import pytest

from megatron_tinyllama.data.indexed import read_index
from megatron_tinyllama.data.preprocess import PreprocessConfig, main, preprocess_data
from megatron_tinyllama.data.tokenizer import load_tokenizer

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "A document that quotes </s> and <s> in its text must not gain special tokens.",
    "Unicode: caf\u00e9, na\u00efve, \u4e2d\u6587, \U0001F600.",
    "Numbers 1234 and 56.78 split into digits.",
]


def write_jsonl(path: Path, records, key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record if isinstance(record, dict) else {key: record}) + "\n")
    return path


def run(tmp_path, inputs, tokenizer, name="out", **kwargs):
    cfg = PreprocessConfig(inputs=tuple(str(p) for p in inputs), output_prefix=str(tmp_path / name),
                           tokenizer_model=str(tokenizer), progress=False, **kwargs)
    return preprocess_data(cfg)


def dataset_docs(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_megatron_reads_what_we_write_with_eos_exactly_once_per_document(tmp_path, llama_spm):
    tok = load_tokenizer(llama_spm)
    summary = run(tmp_path, [write_jsonl(tmp_path / "a.jsonl", DOCS)], llama_spm, append_eod=True)
    prefix = summary.outputs["text"]
    assert prefix == str(tmp_path / "out_text_document")  # Megatron-LM naming
    docs = dataset_docs(prefix)
    assert docs == [tok.encode(d) + [tok.eos_id] for d in DOCS]
    flat = np.concatenate([np.array(d) for d in docs])
    assert np.count_nonzero(flat == tok.eos_id) == len(DOCS)  # no filler, no padding
    assert np.count_nonzero(flat == tok.bos_id) == 0
    info = read_index(prefix)
    assert info.dtype == np.uint16
    assert info.num_tokens == os.path.getsize(prefix + ".bin") // 2 == summary.tokens["text"]
    assert info.document_indices.tolist() == list(range(len(DOCS) + 1))


def test_bos_and_eos_wrap_each_document_once(tmp_path, llama_spm):
    tok = load_tokenizer(llama_spm)
    summary = run(tmp_path, [write_jsonl(tmp_path / "a.jsonl", DOCS)], llama_spm,
                  append_eod=True, bos=True)
    docs = dataset_docs(summary.outputs["text"])
    assert docs == [[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in DOCS]


def test_empty_documents_and_blank_lines_are_skipped_and_counted(tmp_path, llama_spm):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["one", "", "   ", "two"]) + "\n\n")
    summary = run(tmp_path, [path], llama_spm, append_eod=True)
    assert summary.documents["text"] == 2 and summary.empty_documents["text"] == 2
    assert summary.blank_lines == 1 and summary.records == 4
    assert "2 empty docs skipped" in summary.format()


def test_all_input_formats_give_the_same_tokens(tmp_path, llama_spm):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    reference = run(tmp_path, [write_jsonl(tmp_path / "a.jsonl", DOCS)], llama_spm, name="ref",
                    append_eod=True)
    expected = dataset_docs(reference.outputs["text"])

    zst = tmp_path / "z.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "a.jsonl").read_bytes()))
    pq.write_table(pa.table({"content": DOCS, "size": [len(d) for d in DOCS]}),
                   tmp_path / "star.parquet", row_group_size=2)
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    for i, doc in enumerate(DOCS):
        (text_dir / f"{i}.txt").write_text(doc, encoding="utf-8")
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(d.replace("\n", " ") for d in DOCS) + "\n")

    got = run(tmp_path, [zst], llama_spm, name="zst", append_eod=True)
    assert dataset_docs(got.outputs["text"]) == expected
    got = run(tmp_path, [tmp_path / "star.parquet"], llama_spm, name="pq", append_eod=True,
              json_keys=("content",))
    assert got.outputs["content"] == str(tmp_path / "pq_content_document")
    assert dataset_docs(got.outputs["content"]) == expected
    got = run(tmp_path, [text_dir], llama_spm, name="txt", append_eod=True)  # a directory
    assert dataset_docs(got.outputs["text"]) == expected
    got = run(tmp_path, [lines], llama_spm, name="lines", append_eod=True, text_mode="line")
    tok = load_tokenizer(llama_spm)
    assert dataset_docs(got.outputs["text"]) == [tok.encode(d.replace("\n", " ")) + [tok.eos_id]
                                                 for d in DOCS]


def test_slimpajama_github_filter_and_multiple_keys(tmp_path, llama_spm):
    records = [{"text": f"doc {i}", "title": f"title {i}",
                "meta": {"redpajama_set_name": "RedPajamaGithub" if i % 3 == 0 else "RedPajamaC4"}}
               for i in range(9)]
    summary = run(tmp_path, [write_jsonl(tmp_path / "sp.jsonl", records)], llama_spm,
                  name="{key}_document", json_keys=("text", "title"),
                  exclude=(("meta.redpajama_set_name", "RedPajamaGithub"),))
    assert summary.filtered == 3 and summary.records == 9
    assert summary.outputs == {"text": str(tmp_path / "text_document"),
                               "title": str(tmp_path / "title_document")}
    tok = load_tokenizer(llama_spm)
    kept = [i for i in range(9) if i % 3]
    assert dataset_docs(tmp_path / "text_document") == [tok.encode(f"doc {i}") for i in kept]
    assert dataset_docs(tmp_path / "title_document") == [tok.encode(f"title {i}") for i in kept]


def test_output_is_identical_for_any_worker_count_and_chunk_size(tmp_path, llama_spm):
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())[:60]
    src = write_jsonl(tmp_path / "big.jsonl", texts)
    one = run(tmp_path, [src], llama_spm, name="w1", append_eod=True, workers=1, segment_cache=False)
    two = run(tmp_path, [src], llama_spm, name="w2", append_eod=True, workers=2, chunk_bytes=20_000)
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(one.outputs["text"] + ext, two.outputs["text"] + ext, shallow=False)
    assert one.tokens == two.tokens and one.documents["text"] == len(texts)
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert leftovers == []


def test_inputs_expand_globs_and_directories_in_a_stable_order(tmp_path, llama_spm):
    tok = load_tokenizer(llama_spm)
    (tmp_path / "d").mkdir()
    for name, doc in [("b.jsonl", "second"), ("a.jsonl", "first"), ("c.txt", "third")]:
        path = tmp_path / "d" / name
        if name.endswith(".txt"):
            path.write_text(doc)
        else:
            write_jsonl(path, [doc])
    summary = run(tmp_path, [tmp_path / "d" / "*.jsonl", tmp_path / "d"], llama_spm)
    assert summary.files == 3  # the directory re-lists a and b: duplicates are dropped
    assert dataset_docs(summary.outputs["text"]) == [tok.encode(d) for d in
                                                     ("first", "second", "third")]


def test_large_vocabularies_are_stored_as_int32(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(70_000)]
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    summary = run(tmp_path, [write_jsonl(tmp_path / "a.jsonl", ["w5 w69999", "w65535 w0"])],
                  tmp_path / "tokenizer.json", append_eod=True)
    assert read_index(summary.outputs["text"]).dtype == np.int32
    assert dataset_docs(summary.outputs["text"]) == [[8, 70002, 2], [65538, 3, 2]]


def test_cli_prints_progress_and_summary(tmp_path, llama_spm, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    size = src.stat().st_size
    code = main(["--input", str(src), "--output-prefix", str(tmp_path / "cli"), "--tokenizer-model",
                 str(llama_spm), "--append-eod", "--workers", "1",
                 "--log-interval", "2"])  # Megatron-LM's flag is accepted
    assert code == 0
    out, err = capsys.readouterr()
    assert "5 docs" in out and "tokens/s" in out and "docs/s" in out and "B/s" in out
    final = err.strip().split("\r")[-1]  # tqdm redraws with carriage returns
    assert final.startswith("preprocess: 100%") and f"{size}/{size}" in final.replace("B", "")
    assert "5 docs (" in final and " tok (" in final and "/s)" in final
    assert (tmp_path / "cli_text_document.idx").exists()
    main(["--input", str(src), "--output-prefix", str(tmp_path / "q"), "--tokenizer-model",
          str(llama_spm), "--quiet"])
    assert capsys.readouterr().err == ""
