"""examples/tinyllama_v1_1/prepare_data.sh on small synthetic copies of the released layouts.

Each corpus is laid out as its Hugging Face dataset repository is (file names, formats and field
names of SlimPajama-627B, starcoderdata, proof-pile-2 and SkyPile-150B), with decoys the recipe
must leave out: StarCoder languages other than Python and Jupyter (and a subset with other columns),
Proof-Pile-2's validation and test splits, SlimPajama's GitHub subset. The datasets written are read
back with megatron-core's IndexedDataset and must hold exactly the kept documents, in order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tinyllama.config import load_config
from megatron_tinyllama.data.blend import parse_blend
from megatron_tinyllama.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "tinyllama_v1_1" / "prepare_data.sh"


def _jsonl(path: Path, records: list[dict], zst: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if zst:
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


def _parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _code_rows(texts: list[str], lang: str) -> list[dict]:
    # starcoderdata's code columns: max_stars_repo_path, max_stars_repo_name, max_stars_count,
    # id, content.
    return [{"max_stars_repo_path": f"src/f{i}.{lang}", "max_stars_repo_name": "org/repo",
             "max_stars_count": i, "id": f"{lang}-{i}", "content": t} for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Synthetic roots; returns (roots, the documents each dataset must hold, in order)."""
    root = tmp_path_factory.mktemp("corpora")
    keep: dict[str, list[str]] = {}

    slim = root / "SlimPajama-627B"
    web = {"meta": {"redpajama_set_name": "RedPajamaCommonCrawl"}}
    github = {"meta": {"redpajama_set_name": "RedPajamaGithub"}}
    _jsonl(slim / "train/chunk1/example_train_0.jsonl.zst",
           [{"text": "Web page one.", **web}, {"text": "def github(): pass", **github},
            {"text": "Book chapter two.", "meta": {"redpajama_set_name": "RedPajamaBook"}}], zst=True)
    _jsonl(slim / "train/chunk2/example_train_1.jsonl.zst", [{"text": "Wiki three.", **web}], zst=True)
    _jsonl(slim / "validation/chunk1/example_holdout_0.jsonl.zst",
           [{"text": "Held out.", **web}, {"text": "int main(){}", **github}], zst=True)
    keep["slimpajama_text_document"] = ["Web page one.", "Book chapter two.", "Wiki three."]
    keep["slimpajama_validation_text_document"] = ["Held out."]

    star = root / "starcoderdata"
    _parquet(star / "python/train-00000-of-00002.parquet",
             _code_rows(["import os\nprint(os.sep)\n", "x = 1\n"], "py"))
    _parquet(star / "python/train-00001-of-00002.parquet", _code_rows(["def f():\n    return 2\n"], "py"))
    _parquet(star / "jupyter-scripts-dedup-filtered/train-00000-of-00001.parquet",
             _code_rows(["# In[1]:\nimport numpy as np\n"], "py"))
    _parquet(star / "jupyter-structured-clean-dedup/train-00000-of-00001.parquet",
             _code_rows(["<jupyter_code>plt.plot(x)\n<jupyter_output>"], "ipynb"))
    _parquet(star / "java/train-00000-of-00001.parquet", _code_rows(["class A {}"], "java"))
    _parquet(star / "github-issues-filtered-structured/train-00000-of-00001.parquet",
             [{"repo": "org/repo", "issue_id": 1, "events": "opened"}])
    keep["starcoder_python_jupyter_content_document"] = [
        "import os\nprint(os.sep)\n", "x = 1\n", "def f():\n    return 2\n",
        "# In[1]:\nimport numpy as np\n", "<jupyter_code>plt.plot(x)\n<jupyter_output>"]

    pp2 = root / "proof-pile-2"
    for subset, name, texts in [("algebraic-stack", "python0000", ["theorem add_comm"]),
                                ("arxiv", "arXiv_000", [r"\begin{proof} trivial \end{proof}"]),
                                ("open-web-math", "shard-0000", ["Let x^2 = 4.", "So x = 2."])]:
        _jsonl(pp2 / subset / "train" / f"{name}.jsonl.zst",
               [{"text": t, "meta": {"source": subset}} for t in texts], zst=True)
        for split in ("validation", "test"):
            _jsonl(pp2 / subset / split / f"{name}.jsonl.zst",
                   [{"text": f"{split} {subset}", "meta": {}}], zst=True)
    keep["proof_pile_2_text_document"] = [
        "theorem add_comm", r"\begin{proof} trivial \end{proof}", "Let x^2 = 4.", "So x = 2."]

    sky = root / "SkyPile-150B"
    _jsonl(sky / "data/2020-40_zh_head_0000.jsonl", [{"text": "天工开物。"}, {"text": "你好，世界"}])
    _jsonl(sky / "data/2023-06_zh_middle_0011.jsonl", [{"text": "中文网页"}])
    (sky / "README.md").write_text("# SkyPile-150B\n")
    keep["skypile_text_document"] = ["天工开物。", "你好，世界", "中文网页"]

    roots = {"SLIMPAJAMA": slim, "STARCODER": star, "PROOF_PILE_2": pp2, "SKYPILE": sky}
    return roots, keep


@pytest.fixture(scope="module")
def prepared(corpora, llama_spm, tmp_path_factory):
    roots, keep = corpora
    out = tmp_path_factory.mktemp("data")
    env = {**os.environ, **{k: str(v) for k, v in roots.items()}, "TOKENIZER": str(llama_spm),
           "OUT": str(out), "WORKERS": "1", "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, keep


def test_each_corpus_holds_exactly_the_recipe_s_documents(prepared, llama_spm):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out, keep = prepared
    tok = load_tokenizer(llama_spm)
    for name, texts in keep.items():
        dataset = IndexedDataset(str(out / name))
        got = [dataset[i].tolist() for i in range(len(dataset))]
        assert got == [tok.encode(t) + [tok.eos_id] for t in texts], name


def test_prepared_prefixes_are_those_the_v1_1_recipes_blend(prepared):
    out, keep = prepared
    named = set()
    for recipe in (REPO / "examples" / "tinyllama_v1_1").glob("*.yaml"):
        cfg = load_config(recipe)
        for blend in (cfg.data.blend, cfg.data.valid_blend):
            named |= {Path(p).name for p in parse_blend(blend)[0]}
    assert named == set(keep)
    assert {p.name[: -len(".bin")] for p in out.glob("*.bin")} == set(keep)


def test_a_missing_root_is_skipped_and_a_missing_tokenizer_is_named(tmp_path, corpora, llama_spm):
    roots, _ = corpora
    env = {k: v for k, v in os.environ.items() if k not in roots}
    env.update(SKYPILE=str(roots["SKYPILE"]), TOKENIZER=str(llama_spm), OUT=str(tmp_path),
               WORKERS="1", PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["skypile_text_document.bin"]
    del env["TOKENIZER"]
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "TOKENIZER" in proc.stderr
