"""Bad input: clear errors naming file and line, nothing half-written; or counted with --skip-bad-lines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_tinyllama.data import preprocess as preprocess_module
from megatron_tinyllama.data.preprocess import PreprocessConfig, main, preprocess_data
from megatron_tinyllama.data.readers import BadInputError

GOOD = json.dumps({"text": "a good line"})
BAD_LINES = {
    "malformed JSON": (b'{"text": "unterminated\n', "malformed JSON"),
    "missing key": (json.dumps({"content": "x"}).encode() + b"\n", "missing key 'text'"),
    "non-UTF-8": (b'{"text": "caf\xe9"}\n', "not valid UTF-8"),
    "not a string": (json.dumps({"text": 3}).encode() + b"\n", "holds int"),
    "not an object": (b"[1, 2]\n", "expected a JSON object"),
    # Valid JSON and valid UTF-8 bytes, but the string cannot be encoded (before: a bare
    # TypeError from the tokenizer, no file:line, also with --skip-bad-lines).
    "lone surrogate": (b'{"text": "abc \\ud800 def"}\n', "lone surrogate U+D800 at character 5"),
}


def _file_with_bad_line(tmp_path, bad: bytes):
    path = tmp_path / "in.jsonl"
    path.write_bytes(f"{GOOD}\n{GOOD}\n".encode() + bad + f"{GOOD}\n".encode())
    return path  # the bad line is line 3


def _cfg(tmp_path, inputs, tokenizer, **kwargs) -> PreprocessConfig:
    return PreprocessConfig(inputs=tuple(map(str, inputs)), output_prefix=str(tmp_path / "out"),
                            tokenizer_model=str(tokenizer), append_eod=True, progress=False, **kwargs)


def _outputs(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out"))


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_bad_line_is_an_error_naming_file_and_line_and_nothing_is_written(tmp_path, llama_spm, name):
    bad, message = BAD_LINES[name]
    path = _file_with_bad_line(tmp_path, bad)
    with pytest.raises(BadInputError) as info:
        preprocess_data(_cfg(tmp_path, [path], llama_spm, chunk_bytes=16))
    assert (info.value.path, info.value.line) == (str(path), 3)
    assert str(info.value).startswith(f"{path}:3: ") and message in str(info.value)
    assert _outputs(tmp_path) == []  # no .bin/.idx, no temporary files


def test_skip_bad_lines_counts_each_reason_and_keeps_the_good_lines(tmp_path, llama_spm):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join([f"{GOOD}\n".encode(), *(bad for bad, _ in BAD_LINES.values()),
                               f"{GOOD}\n".encode()]))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    summary = preprocess_data(_cfg(tmp_path, [path, empty], llama_spm, skip_bad_lines=True))
    assert summary.documents["text"] == 2 and summary.bad_lines == 6
    assert summary.bad_line_reasons == {"bad_json": 1, "missing_key": 1, "not_utf8": 1,
                                        "not_a_string": 1, "not_an_object": 1,
                                        "lone_surrogate": 1}
    assert summary.bad_files == [f"{empty}: empty file (0 bytes)"]
    report = summary.format()
    assert "bad lines skipped: 6" in report and f"{path}:2: malformed JSON" in report
    assert "bad files skipped: 1" in report


def test_zero_byte_file_is_an_error_by_default(tmp_path, llama_spm):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(BadInputError, match="empty file"):
        preprocess_data(_cfg(tmp_path, [empty], llama_spm))
    assert _outputs(tmp_path) == []


def test_corrupt_compressed_and_parquet_files_are_errors(tmp_path, llama_spm):
    zst = tmp_path / "bad.jsonl.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 10)
    with pytest.raises(BadInputError, match="cannot read"):
        preprocess_data(_cfg(tmp_path, [zst], llama_spm, skip_bad_lines=True))
    parquet = tmp_path / "bad.parquet"
    parquet.write_bytes(b"PAR1 not really")
    with pytest.raises(BadInputError, match="parquet"):
        preprocess_data(_cfg(tmp_path, [parquet], llama_spm))
    assert _outputs(tmp_path) == []


def test_missing_inputs_and_unsupported_types_are_errors(tmp_path, llama_spm):
    with pytest.raises(BadInputError, match="no such file"):
        preprocess_data(_cfg(tmp_path, [tmp_path / "nope*.jsonl"], llama_spm))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(BadInputError, match="unsupported input type"):
        preprocess_data(_cfg(tmp_path, [tmp_path / "data.csv"], llama_spm))


def test_failure_keeps_an_existing_dataset_untouched(tmp_path, llama_spm, monkeypatch):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join([GOOD] * 50) + "\n")
    preprocess_data(_cfg(tmp_path, [good], llama_spm))
    before = {n: (tmp_path / n).read_bytes() for n in _outputs(tmp_path)}
    assert sorted(before) == ["out_text_document.bin", "out_text_document.idx",
                              "out_text_document.meta.json"]

    calls = {"n": 0}
    real = preprocess_module.tokenize_documents

    def interrupted(*args, **kwargs):  # Ctrl-C after a few units were already written
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(preprocess_module, "tokenize_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess_data(_cfg(tmp_path, [good], llama_spm, chunk_bytes=64))
    assert calls["n"] == 3
    assert {n: (tmp_path / n).read_bytes() for n in _outputs(tmp_path)} == before


def test_cli_reports_bad_input_without_traceback(tmp_path, llama_spm, capsys):
    path = _file_with_bad_line(tmp_path, BAD_LINES["malformed JSON"][0])
    code = main(["--input", str(path), "--output-prefix", str(tmp_path / "out"),
                 "--tokenizer-model", str(llama_spm), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert f"error: {path}:3: malformed JSON" in err and "--skip-bad-lines" in err
    assert "Traceback" not in err and _outputs(tmp_path) == []


def test_console_script_exits_non_zero_with_a_one_line_message(tmp_path, llama_spm):
    path = _file_with_bad_line(tmp_path, BAD_LINES["non-UTF-8"][0])
    result = subprocess.run(
        [sys.executable, "-m", "megatron_tinyllama.data.preprocess", "--input", str(path),
         "--output-prefix", str(tmp_path / "out"), "--tokenizer-model", str(llama_spm),
         "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"{path}:3: not valid UTF-8" in result.stderr and "Traceback" not in result.stderr
    assert _outputs(tmp_path) == []


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_utf8_bom_on_the_first_line_is_dropped_as_utf8_sig_does(tmp_path, llama_spm, suffix):
    """A BOM at the start of a file (Windows editors write one) failed the first jsonl line as
    malformed JSON. It is dropped, as Python's ``utf-8-sig`` reads the file; a U+FEFF later in
    the file is text and stays."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_tinyllama.data.tokenizer import load_tokenizer

    if suffix == ".jsonl":
        body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                       for t in ("first line", "a \ufeff inside"))
    else:
        body = "first line\na \ufeff inside\n"
    path = tmp_path / f"in{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    with open(path, encoding="utf-8-sig") as stream:  # what Python itself reads
        text = stream.read()
    docs = ([json.loads(line)["text"] for line in text.splitlines()] if suffix == ".jsonl"
            else [text])
    summary = preprocess_data(_cfg(tmp_path, [path], llama_spm))
    dataset = IndexedDataset(summary.outputs["text"])
    tok = load_tokenizer(llama_spm)
    assert [dataset[i].tolist() for i in range(len(dataset))] == \
        [tok.encode(doc) + [tok.eos_id] for doc in docs]
