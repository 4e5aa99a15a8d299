"""Data faults injected one by one: each is reproduced, then its exit status, its message naming the
place, and the bytes of every earlier good dataset are checked.

The good datasets (made once per module by the real preprocessing tool) sit in their own folder;
every test that injects a fault ends by checking their bytes are unchanged.
"""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zstandard

from megatron_tinyllama.config import ConfigError, DataConfig, config_from_dict
from megatron_tinyllama.data.indexed import IndexFormatError, read_index
from megatron_tinyllama.data.loader import build_train_batches
from megatron_tinyllama.data.merge import MergeError, main as merge_main, merge_datasets
from megatron_tinyllama.data.preprocess import PreprocessConfig, main as preprocess_main, \
    preprocess_data
from megatron_tinyllama.data.provenance import TokenIdError, check_data_vocab, \
    read_tokenizer_record
from megatron_tinyllama.data.readers import BadInputError
from megatron_tinyllama.train.loop import train
from tests.conftest import REPO_ROOT, train_llama_style_spm

SEQ = 16


def _jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def _texts(n: int, tag: str) -> list[str]:
    return [f"{tag} document {i}: " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(10 + i % 30))
            for i in range(n)]


def _preprocess(inputs, prefix: Path, tokenizer, **kwargs):
    cfg = PreprocessConfig(inputs=tuple(map(str, inputs)), output_prefix=str(prefix),
                           tokenizer_model=str(tokenizer), append_eod=True, progress=False,
                           **kwargs)
    return preprocess_data(cfg)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def good(tmp_path_factory, llama_spm):
    """A good dataset made by the preprocessing tool; its folder's bytes must never change."""
    folder = tmp_path_factory.mktemp("good")
    source = _jsonl(tmp_path_factory.mktemp("good_src") / "good.jsonl", _texts(60, "good"))
    summary = _preprocess([source], folder / "good", llama_spm)
    prefix = summary.outputs["text"]
    return prefix, _snapshot(folder)


def _assert_good_unchanged(good) -> None:
    prefix, before = good
    assert _snapshot(Path(prefix).parent) == before


def _batches(prefix, cache_dir, num_samples=64, **kwargs) -> list[dict]:
    cfg = DataConfig(blend=(str(prefix),), cache_dir=str(cache_dir))
    return list(build_train_batches(cfg, seq_length=SEQ, micro_batch_size=2, dp_rank=0, dp_size=1,
                                    consumed_samples=0, seed=3, global_batch_size_at=8,
                                    num_samples=num_samples, **kwargs))


def _tokens(batches) -> torch.Tensor:
    return torch.cat([b["tokens"] for b in batches])


# ---------------------------------------------------------------------------------------------
# 1. Re-preprocessing a prefix must not leave the old sample-index cache in use.


def test_re_preprocessed_prefix_does_not_reuse_the_old_sample_index_cache(tmp_path, llama_spm,
                                                                         good):
    prefix = tmp_path / "data" / "corpus"
    cache = tmp_path / "cache"
    first = _preprocess([_jsonl(tmp_path / "v1.jsonl", _texts(80, "old"))], prefix, llama_spm)
    old = _tokens(_batches(first.outputs["text"], cache))
    # Same prefix, new (smaller) contents: the old cache's sample index points past its end.
    second = _preprocess([_jsonl(tmp_path / "v2.jsonl", _texts(25, "new"))], prefix, llama_spm)
    assert second.outputs == first.outputs
    again = _tokens(_batches(second.outputs["text"], cache))
    fresh = _tokens(_batches(second.outputs["text"], tmp_path / "fresh_cache"))
    assert torch.equal(again, fresh) and not torch.equal(again[:len(old)], old[:len(again)])
    _assert_good_unchanged(good)


# ---------------------------------------------------------------------------------------------
# 2. A .jsonl.zst cut short is truncation, named as such, whatever byte it was cut at.


def _zst_in_blocks(path: Path, texts, docs_per_block: int) -> tuple[Path, list[int]]:
    """A one-frame zstd file flushed every ``docs_per_block`` documents; returns the flush offsets."""
    buffer = io.BytesIO()
    writer = zstandard.ZstdCompressor().stream_writer(buffer, closefd=False)
    ends = []
    for i, text in enumerate(texts):
        writer.write((json.dumps({"text": text}) + "\n").encode())
        if i % docs_per_block == docs_per_block - 1:
            writer.flush(zstandard.FLUSH_BLOCK)
            ends.append(buffer.tell())
    writer.flush(zstandard.FLUSH_FRAME)
    path.write_bytes(buffer.getvalue())
    return path, ends


def _outputs(folder: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(name))


def test_zst_cut_at_a_block_boundary_is_reported_as_truncated(tmp_path, llama_spm, good, capsys):
    whole, ends = _zst_in_blocks(tmp_path / "whole.jsonl.zst", _texts(79, "z"), 10)
    assert _preprocess([whole], tmp_path / "ok", llama_spm).documents["text"] == 79
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(whole.read_bytes()[:ends[2]])  # 30 whole documents decode from this
    code = preprocess_main(["--input", str(cut), "--output-prefix", str(tmp_path / "out"),
                            "--tokenizer-model", str(llama_spm), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and f"error: {cut}: truncated" in err and "Traceback" not in err
    assert _outputs(tmp_path) == []
    _assert_good_unchanged(good)


def test_zst_cut_inside_a_line_is_truncation_not_malformed_json(tmp_path, llama_spm, good):
    whole, ends = _zst_in_blocks(tmp_path / "whole.jsonl.zst", _texts(79, "z"), 10)
    for cut_at in (ends[0] + 7, len(whole.read_bytes()) - 3):
        cut = tmp_path / f"cut{cut_at}.jsonl.zst"
        cut.write_bytes(whole.read_bytes()[:cut_at])
        for workers in (1, 2):
            with pytest.raises(BadInputError, match="truncated") as info:
                _preprocess([cut], tmp_path / "out", llama_spm, workers=workers,
                            skip_bad_lines=True)
            assert info.value.path == str(cut) and "malformed" not in str(info.value)
    assert _outputs(tmp_path) == []
    _assert_good_unchanged(good)


def test_multi_frame_zst_files_are_read_whole(tmp_path, llama_spm):
    texts = _texts(79, "f")
    frames = [zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[i:i + 10]).encode())
        for i in range(0, 79, 10)]
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(b"".join(frames))
    plain = _preprocess([_jsonl(tmp_path / "plain.jsonl", texts)], tmp_path / "plain", llama_spm)
    zst = _preprocess([path], tmp_path / "zst", llama_spm, chunk_bytes=1000)
    assert zst.documents == plain.documents == {"text": 79}
    assert Path(zst.outputs["text"] + ".bin").read_bytes() == \
        Path(plain.outputs["text"] + ".bin").read_bytes()


# ---------------------------------------------------------------------------------------------
# 4. An .idx whose pointers or document indices disagree with its lengths is refused on opening.

_HEADER = 9 + 8 + 1 + 8 + 8


def _copy_dataset(prefix: str, to: Path) -> str:
    for suffix in (".bin", ".idx"):
        (to.parent / (to.name + suffix)).write_bytes(Path(prefix + suffix).read_bytes())
    return str(to)


def _poke(prefix: str, offset: int, value: int, dtype) -> None:
    """Write one value into the .idx, as a new file (a new version, as any tool writes it)."""
    path = Path(prefix + ".idx")
    data = bytearray(path.read_bytes())
    item = np.array([value], dtype=dtype).tobytes()
    data[offset:offset + len(item)] = item
    Path(f"{path}.new").write_bytes(bytes(data))
    Path(f"{path}.new").replace(path)


def _corrupt(kind: str, prefix: str) -> str:
    """Damage one field of the index and return what the error must say."""
    info = read_index(prefix)
    n_seq, n_doc = info.num_sequences, info.num_documents + 1
    pointers, docs = _HEADER + 4 * n_seq, _HEADER + 12 * n_seq
    if kind == "pointer":  # sequence 3 starts 2 tokens late: megatron-core reads shifted bytes
        _poke(prefix, pointers + 8 * 3, int(info.sequence_pointers[3]) + 4, np.int64)
        return "sequence 3 starts at byte"
    if kind == "document order":
        _poke(prefix, docs + 8 * 2, int(info.document_indices[4]), np.int64)
        return "document indices decrease"
    if kind == "document end":
        _poke(prefix, docs + 8 * (n_doc - 1), n_seq - 1, np.int64)
        return f"last document ends at sequence {n_seq - 1}, not {n_seq}"
    if kind == "negative length":  # lengths still sum to the .bin size
        first, second = (int(n) for n in info.sequence_lengths[1:3])
        _poke(prefix, _HEADER + 4 * 1, -first, np.int32)
        _poke(prefix, _HEADER + 4 * 2, second + 2 * first, np.int32)
        return f"sequence 1 has length {-first}"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["pointer", "document order", "document end", "negative length"])
def test_index_that_disagrees_with_itself_is_refused_naming_the_file(tmp_path, good, kind):
    prefix = _copy_dataset(good[0], tmp_path / "bad")
    message = _corrupt(kind, prefix)
    with pytest.raises(IndexFormatError, match=message) as info:
        read_index(prefix)
    assert str(info.value).startswith(f"{prefix}.idx: ")
    with pytest.raises(IndexFormatError, match=message):
        _batches(prefix, tmp_path / "cache")
    assert merge_main(["--input", good[0], prefix, "--output-prefix", str(tmp_path / "out")]) == 1
    assert _outputs(tmp_path) == []
    _assert_good_unchanged(good)


def test_megatron_core_reads_shifted_bytes_from_a_bad_pointer(tmp_path, good):
    """Why the check matters: megatron-core trusts the pointers and returns the wrong tokens."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = _copy_dataset(good[0], tmp_path / "bad")
    dataset = IndexedDataset(prefix)  # held: its memory map closes with it
    right = dataset[3].tolist()
    _corrupt("pointer", prefix)
    dataset = IndexedDataset(prefix)
    assert dataset[3].tolist() != right


# ---------------------------------------------------------------------------------------------
# 3. Token ids the model cannot embed: refused at start where cheap, per sample otherwise.


@pytest.fixture(scope="module")
def big_spm(tmp_path_factory):
    """A second tokenizer, with a bigger vocabulary than ``llama_spm`` (512)."""
    return train_llama_style_spm(tmp_path_factory.mktemp("big_spm"), vocab_size=700)


def _megatron_builder_dataset(prefix: Path, token_lists) -> str:
    """Written by megatron-core's own builder: no tokenizer record."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for tokens in token_lists:
        builder.add_item(torch.tensor(tokens))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_tokenizer_bigger_than_the_model_is_refused_before_any_setup(tmp_path, llama_spm, good):
    data = DataConfig(blend=(good[0],), tokenizer_model=str(llama_spm))
    check_data_vocab(data, 512)
    with pytest.raises(ConfigError, match=rf"data\.tokenizer_model: {llama_spm} has 512 tokens "
                                          rf"but model\.vocab_size=500"):
        check_data_vocab(data, 500)
    # The trainer makes the same check first (no process group, no engine).
    cfg = config_from_dict({"model": {"preset": "tinyllama-debug", "vocab_size": 500},
                            "data": {"blend": good[0], "tokenizer_model": str(llama_spm)}})
    with pytest.raises(ConfigError, match="data.tokenizer_model"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"data\.tokenizer_model: .*not found"):
        check_data_vocab(DataConfig(blend=(good[0],), tokenizer_model=str(tmp_path / "nope")), 512)
    _assert_good_unchanged(good)


def test_datasets_record_their_tokenizer_and_are_checked_against_model_and_recipe(
        tmp_path, llama_spm, big_spm, good):
    big = _preprocess([_jsonl(tmp_path / "b.jsonl", _texts(30, "big"))], tmp_path / "big",
                      big_spm).outputs["text"]
    record = read_tokenizer_record(big)
    assert (record.vocab_size, record.kind, record.file) == (700, "sentencepiece", str(big_spm))
    assert read_tokenizer_record(good[0]).vocab_size == 512
    # The dataset alone (no tokenizer in the recipe) is bigger than the model.
    with pytest.raises(ConfigError, match=rf"data\.blend: {big} was tokenized with {big_spm} "
                                          rf"\(sentencepiece, 700 tokens.*model\.vocab_size=512"):
        check_data_vocab(DataConfig(blend=(big,)), 512)
    # Made with another tokenizer than the recipe's, even when both fit.
    with pytest.raises(ConfigError, match=rf"data\.valid_blend: {big} .* not with "
                                          rf"data\.tokenizer_model={llama_spm}"):
        check_data_vocab(DataConfig(blend=(good[0],), valid_blend=(big,),
                                    tokenizer_model=str(llama_spm)), 1024)
    # Two datasets of one blend from different tokenizers.
    with pytest.raises(ConfigError, match=rf"data\.blend: {big} .* but {good[0]} with {llama_spm}"):
        check_data_vocab(DataConfig(blend=("0.5", good[0], "0.5", big)), 1024)
    _assert_good_unchanged(good)


def test_merge_refuses_datasets_from_different_tokenizers(tmp_path, llama_spm, big_spm, good,
                                                          capsys):
    big = _preprocess([_jsonl(tmp_path / "b.jsonl", _texts(30, "big"))], tmp_path / "big",
                      big_spm).outputs["text"]
    code = merge_main(["--input", good[0], big, "--output-prefix", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and f"error: {big} was tokenized with {big_spm}" in err
    assert f"but {good[0]} with {llama_spm}" in err and _outputs(tmp_path) == []
    with pytest.raises(MergeError, match="tokenize them alike"):
        merge_datasets([big, good[0]], str(tmp_path / "out"))
    # Same tokenizer: merged, and the output carries the record.
    same = _preprocess([_jsonl(tmp_path / "s.jsonl", _texts(20, "same"))], tmp_path / "same",
                       llama_spm).outputs["text"]
    summary = merge_datasets([good[0], same], str(tmp_path / "out"))
    assert summary.tokenizer == read_tokenizer_record(good[0]) == \
        read_tokenizer_record(str(tmp_path / "out"))
    # With a dataset that has no record, the output records none and says so.
    plain = _megatron_builder_dataset(tmp_path / "plain", [[5, 6, 7]])
    assert merge_main(["--input", good[0], plain, "--output-prefix", str(tmp_path / "mixed")]) == 0
    assert f"tokenizer: not recorded (1 of the inputs carry no record, e.g. {plain})" in \
        capsys.readouterr().out
    assert read_tokenizer_record(str(tmp_path / "mixed")) is None
    _assert_good_unchanged(good)


def test_merge_refuses_one_dataset_named_twice_naming_both_arguments(tmp_path, good, capsys,
                                                                    monkeypatch):
    """``./x``, ``x``, ``/abs/x``, a symlink, a copy: before, each merged again (rc 0)."""
    work = tmp_path / "work"
    (work / "linked").mkdir(parents=True)
    monkeypatch.chdir(work)
    _copy_dataset(good[0], work / "x")
    _copy_dataset(good[0], work / "copy")
    for suffix in (".bin", ".idx"):
        os.symlink(work / f"x{suffix}", work / "linked" / f"x{suffix}")
    (work / "folder").mkdir()
    os.symlink(work / "x.idx", work / "folder" / "y.idx")
    os.symlink(work / "x.bin", work / "folder" / "y.bin")
    cases = [(["./x", "x", str(work / "x")], "--input x and --input ./x are one dataset, the same files"),
             (["x", "x"], "--input x and --input x are one dataset, the same files"),
             (["x", "linked/x"], f"--input linked/x and --input x are one dataset, the same files "
                                 f"({work}/x.idx)"),
             (["folder", "x*"], "--input x* (x) and --input folder (folder/y) are one dataset"),
             (["x", "copy"], "--input copy and --input x are one dataset, byte-identical copies")]
    for inputs, message in cases:
        code = merge_main(["--input", *inputs, "--output-prefix", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 1 and f"error: {message}" in err, (inputs, err)
        assert "repeat each of its documents" in err and "Traceback" not in err
        assert "error: nothing was written" in err and _outputs(tmp_path) == []
    with pytest.raises(MergeError, match="byte-identical copies"):
        merge_datasets(["x", str(good[0])], str(tmp_path / "out"))
    # Equal document lengths but other tokens (same .idx, other .bin): two datasets, merged.
    other = Path(_copy_dataset(good[0], work / "other"))
    tokens = np.fromfile(f"{other}.bin", dtype=np.uint16)
    (tokens[::-1].copy()).tofile(f"{other}.bin")
    summary = merge_datasets(["x", str(other)], str(tmp_path / "out"))
    assert summary.documents == 2 * read_index(good[0]).num_documents
    # Empty datasets add nothing: two of them are not a duplicate.
    for name in ("e1", "e2"):
        _megatron_builder_dataset(work / name, [])
    assert merge_datasets(["x", "e1", "e2"], str(tmp_path / "out2")).documents == \
        read_index(good[0]).num_documents
    _assert_good_unchanged(good)


def test_token_ids_past_the_vocabulary_are_named_per_sample(tmp_path, good):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 512, size=40).tolist() for _ in range(30)]
    docs[7][5] = 600  # one id of a bigger tokenizer, in a dataset that records none
    prefix = _megatron_builder_dataset(tmp_path / "plain", docs)
    unchecked = _tokens(_batches(prefix, tmp_path / "cache", num_samples=64))
    with pytest.raises(IndexError):  # what the model would do with it
        torch.nn.Embedding(512, 4)(unchecked)
    with pytest.raises(TokenIdError, match=rf"{prefix}: sample \d+ holds token id 600, outside "
                                           rf"the model's vocabulary \[0, 512\)"):
        _batches(prefix, tmp_path / "cache", num_samples=64, vocab_size=512)
    assert len(_batches(prefix, tmp_path / "cache", num_samples=64, vocab_size=601)) == 32
    _assert_good_unchanged(good)


def test_stale_tokenizer_record_is_ignored_with_a_warning(tmp_path, llama_spm, caplog):
    prefix = _preprocess([_jsonl(tmp_path / "a.jsonl", _texts(10, "a"))], tmp_path / "d",
                         llama_spm).outputs["text"]
    assert read_tokenizer_record(prefix) is not None
    _megatron_builder_dataset(Path(prefix), [[1, 2, 3]])  # another tool rewrites .bin/.idx only
    assert read_tokenizer_record(prefix) is None
    assert "describes other contents" in caplog.text


def test_all_empty_documents_write_nothing_and_fail(tmp_path, llama_spm, good, capsys):
    source = _jsonl(tmp_path / "blank.jsonl", ["", "   ", "\n\n"])
    code = preprocess_main(["--input", str(source), "--output-prefix", str(tmp_path / "out"),
                            "--tokenizer-model", str(llama_spm), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"error: {tmp_path}/out_text_document: no document to write for key 'text' " \
           f"(3 records read, 3 empty" in err
    assert _outputs(tmp_path) == []
    _assert_good_unchanged(good)


# ---------------------------------------------------------------------------------------------
# 5. Output paths that cannot be written, and temporary files of a killed run.


def test_output_prefix_under_a_file_is_a_one_line_error(tmp_path, llama_spm, good, capsys):
    source = _jsonl(tmp_path / "a.jsonl", _texts(5, "a"))
    (tmp_path / "data").write_text("a file where a folder should be")
    code = preprocess_main(["--input", str(source), "--output-prefix",
                            str(tmp_path / "data" / "sub" / "out"), "--tokenizer-model",
                            str(llama_spm), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"{tmp_path}/data is a file, not a folder" in err
    assert merge_main(["--input", good[0], "--output-prefix", str(tmp_path / "data" / "m")]) == 1
    assert f"{tmp_path}/data is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "data").read_text() == "a file where a folder should be"
    _assert_good_unchanged(good)


def _read_only(monkeypatch, folder: Path) -> None:
    """``folder`` as on a read-only mount: creating or opening for writing anything under it fails
    with EROFS (chmod would not stop root, who runs the tests; a mount needs privileges)."""
    import builtins

    real_open, real_mkdir = builtins.open, os.mkdir

    def under(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(str(folder) + os.sep)

    def fake_open(path, mode="r", *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and under(path) and set(mode) & set("wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, mode, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if under(path) and not os.path.isdir(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def test_read_only_output_folder_is_a_one_line_error(tmp_path, llama_spm, good, capsys,
                                                     monkeypatch):
    """Before: a bare ``OSError: [Errno 30] Read-only file system`` traceback."""
    source = _jsonl(tmp_path / "a.jsonl", _texts(5, "a"))
    mount = tmp_path / "ro"
    mount.mkdir()
    _read_only(monkeypatch, mount)
    # A folder to create under the mount: the error names the read-only one that exists.
    for prefix in (mount / "out", mount / "sub" / "out"):
        code = preprocess_main(["--input", str(source), "--output-prefix", str(prefix),
                                "--tokenizer-model", str(llama_spm), "--quiet"])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err, err
        assert f"error: {prefix}_text_document: cannot write here, {mount} is on a read-only " \
               f"file system" in err, err
        assert "error: nothing was written" in err
        code = merge_main(["--input", good[0], "--output-prefix", str(prefix)])
        err = capsys.readouterr().err
        assert code == 1 and f"error: {prefix}: cannot write here, {mount} is on a read-only " \
                             f"file system" in err, err
        assert list(mount.iterdir()) == []
    # Out of space after the first temporary was created: it is removed too.
    import builtins

    real_open = builtins.open

    def full_disk(path, mode="r", *args, **kwargs):
        if ".lengths.tmp" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk)
    assert merge_main(["--input", good[0], "--output-prefix", str(tmp_path / "full" / "m")]) == 1
    assert f"{tmp_path}/full cannot be written (No space left on device)" in \
        capsys.readouterr().err
    assert list((tmp_path / "full").iterdir()) == []
    _assert_good_unchanged(good)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temporaries_of_a_killed_run_are_removed_and_never_read(tmp_path, llama_spm, good):
    prefix = tmp_path / "out_text_document"
    dead, host = _dead_pid(), socket.gethostname()
    live = subprocess.Popen(["sleep", "60"])
    try:
        stale = [f"{prefix}.bin.tmp{dead}", f"{prefix}.idx.tmp{dead}.{host}",
                 f"{prefix}.lengths.tmp{dead}", f"{prefix}.docs.tmp{dead}.{host}",
                 f"{prefix}.meta.json.tmp{dead}"]
        kept = [f"{prefix}.bin.tmp{live.pid}.{host}",  # a run still going
                f"{prefix}.bin.tmp{dead}.other-node"]  # another machine's, on a shared disk
        for path in stale + kept:
            Path(path).write_bytes(b"\xff" * 64)
        # Never read: a merge of the folder sees no dataset in them.
        (tmp_path / "parts").mkdir()
        Path(tmp_path / "parts" / f"x.idx.tmp{dead}").write_bytes(b"junk")
        Path(tmp_path / "parts" / f"x.bin.tmp{dead}").write_bytes(b"junk")
        _copy_dataset(good[0], tmp_path / "parts" / "g")
        assert merge_datasets([str(tmp_path / "parts")], str(tmp_path / "merged")).inputs == \
            (str(tmp_path / "parts" / "g"),)
        summary = _preprocess([_jsonl(tmp_path / "a.jsonl", _texts(5, "a"))], tmp_path / "out",
                              llama_spm)
        assert summary.documents == {"text": 5}
        assert [p for p in stale if Path(p).exists()] == []
        assert all(Path(p).read_bytes() == b"\xff" * 64 for p in kept)
    finally:
        live.kill()
        live.wait()
    _assert_good_unchanged(good)


# ---------------------------------------------------------------------------------------------
# The trainer's exit status for the faults it can see before any set-up.


def _pretrain(tmp_path: Path, name: str, data: dict, vocab_size: int):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"preset": "tinyllama-debug", "vocab_size": vocab_size}, "data": data,
        "train": {"train_tokens": 1024, "global_batch_tokens": 1024, "micro_batch_size": 4,
                  "precision": "fp32"}}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "megatron_tinyllama.train.pretrain", "--config",
                           str(recipe)], capture_output=True, text=True, timeout=300, env=env)


def test_trainer_exits_2_naming_the_field_and_file(tmp_path, llama_spm, big_spm, good):
    big = _preprocess([_jsonl(tmp_path / "b.jsonl", _texts(30, "big"))], tmp_path / "big",
                      big_spm).outputs["text"]
    result = _pretrain(tmp_path, "vocab", {"blend": f"0.5 {good[0]} 0.5 {big}"}, 600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"data.blend: {big} was tokenized with {big_spm} (sentencepiece, 700 tokens" \
        in result.stderr and "Traceback" not in result.stderr
    corrupt = _copy_dataset(good[0], tmp_path / "corrupt")
    _corrupt("pointer", corrupt)
    result = _pretrain(tmp_path, "index", {"blend": corrupt, "tokenizer_model": str(llama_spm)},
                       512)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"data.blend: {corrupt}.idx: sequence 3 starts at byte" in result.stderr
    _assert_good_unchanged(good)
