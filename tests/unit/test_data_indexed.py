"""The .bin/.idx format both ways with megatron-core, atomic writes, and the merge tool."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_tinyllama.data.indexed import (IndexedDatasetWriter, IndexFormatError, read_index,
                                             token_dtype)
from megatron_tinyllama.data.merge import MergeError, main as merge_main, merge_datasets


def _megatron_builder_dataset(prefix, dtype, docs):
    """Write with megatron-core's own builder; docs are lists of sequences (sentences)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for sentences in docs:
        for sentence in sentences:
            builder.add_item(torch.tensor(sentence))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


def _ours(prefix, dtype, docs):
    with IndexedDatasetWriter(str(prefix), dtype) as writer:
        writer.add_documents(np.concatenate([np.array(d) for d in docs]), [len(d) for d in docs])
    return writer


def test_token_dtype_follows_megatron_threshold():
    assert token_dtype(32000) == np.uint16 and token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32 and token_dtype(128256) == np.int32


def test_we_read_megatron_builder_output_including_multi_sentence_documents(tmp_path):
    docs = [[[1, 2, 3], [4, 5]], [[6]], [[7, 8, 9, 10], [11], [12, 13]]]
    _megatron_builder_dataset(tmp_path / "m", np.int32, docs)
    info = read_index(str(tmp_path / "m"))
    assert info.dtype == np.int32 and info.num_documents == 3 and info.num_sequences == 6
    assert info.sequence_lengths.tolist() == [3, 2, 1, 4, 1, 2]
    assert info.document_indices.tolist() == [0, 2, 3, 6]
    assert info.sequence_pointers.tolist() == [0, 12, 20, 24, 40, 44] and info.num_tokens == 13


def test_megatron_reads_ours_byte_identical_to_its_builder(tmp_path):
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 65000]]
    _ours(tmp_path / "ours", np.uint16, docs)
    _megatron_builder_dataset(tmp_path / "theirs", np.uint16, [[d] for d in docs])
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(tmp_path / "ours"))
    assert [dataset[i].tolist() for i in range(3)] == docs
    assert dataset.get(2, offset=1, length=2).tolist() == [10, 11]


def test_empty_dataset_round_trips(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "e"), np.uint16):
        pass
    info = read_index(str(tmp_path / "e"))
    assert (info.num_documents, info.num_sequences, info.num_tokens) == (0, 0, 0)


def test_writer_abort_and_inconsistent_lengths_leave_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as writer:
            writer.add_documents(np.arange(5), [5])
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    writer = IndexedDatasetWriter(str(tmp_path / "y"), np.uint16)
    with pytest.raises(ValueError, match="lengths sum"):
        writer.add_documents(np.arange(5), [4])
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_reader_rejects_corrupt_indexes(tmp_path):
    _ours(tmp_path / "d", np.uint16, [[1, 2, 3]])
    (tmp_path / "d.bin").write_bytes(b"\x00" * 4)  # one token short
    with pytest.raises(IndexFormatError, match="index lists 3 tokens"):
        read_index(str(tmp_path / "d"))
    (tmp_path / "d.idx").write_bytes(b"NOTANIDX" * 5)
    with pytest.raises(IndexFormatError, match="bad header"):
        read_index(str(tmp_path / "d"))


def test_merge_concatenates_ours_and_megatrons_in_name_order(tmp_path, capsys):
    parts = tmp_path / "parts"
    parts.mkdir()
    _ours(parts / "a", np.uint16, [[1, 2], [3]])
    _megatron_builder_dataset(parts / "b", np.uint16, [[[4, 5], [6]], [[7]]])
    _ours(parts / "c", np.uint16, [[8, 9, 10]])
    assert merge_main(["--input", str(parts), "--output-prefix", str(tmp_path / "merged")]) == 0
    assert "3 datasets" in capsys.readouterr().out
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    merged = IndexedDataset(str(tmp_path / "merged"))
    assert [merged[i].tolist() for i in range(len(merged))] == [[1, 2], [3], [4, 5], [6], [7],
                                                                [8, 9, 10]]
    assert merged.document_indices.tolist() == [0, 1, 2, 4, 5, 6]
    summary = merge_datasets([str(parts / "c"), str(parts / "a*")], str(tmp_path / "ca"))
    assert summary.documents == 3 and summary.tokens == 6
    assert [read_index(str(tmp_path / "ca")).sequence_lengths.tolist()] == [[3, 2, 1]]


def test_merge_refuses_mixed_dtypes_and_missing_halves(tmp_path, capsys):
    _ours(tmp_path / "u16", np.uint16, [[1]])
    _ours(tmp_path / "i32", np.int32, [[1]])
    with pytest.raises(MergeError, match="mix token dtypes"):
        merge_datasets([str(tmp_path / "u16"), str(tmp_path / "i32")], str(tmp_path / "out"))
    (tmp_path / "lonely.idx").write_bytes(b"")
    assert merge_main(["--input", str(tmp_path / "lonely"), "--output-prefix",
                       str(tmp_path / "out")]) == 1
    assert "lonely.bin: missing" in capsys.readouterr().err
    with pytest.raises(MergeError, match="also an input"):
        merge_datasets([str(tmp_path / "u16")], str(tmp_path / "u16"))
    assert not (tmp_path / "out.idx").exists()
