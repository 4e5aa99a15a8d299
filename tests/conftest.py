"""Shared fixtures: megatron-core parallel state on CPU, a tiny Llama-style tokenizer, rank spawning."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Several ranks share two cores in CI: one thread each keeps spawned tests from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The suite compiles kernels with inductor (torch.compile levers). Its default cache is one folder
# per user shared by every process on the machine, and a run killed mid-compile (a CI time limit,
# Ctrl-C) can leave a 0-byte .so there that every later compile of that kernel loads and fails on
# ("file too short"). Each test session compiles into its own folder, inherited by the ranks it
# spawns, and removes it at exit; the compile cost is paid once per session.
_COMPILE_CACHE = Path(tempfile.mkdtemp(prefix="tinyllama-test-inductor-"))
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_COMPILE_CACHE / "inductor")
os.environ["TRITON_CACHE_DIR"] = str(_COMPILE_CACHE / "triton")
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Files holding slow tests run first. The README's command runs two workers that take whole
    files (``-n 2 --dist loadfile``) in collection order; with the slow files last, one worker ran
    the last of them alone while the other sat idle. Stable: the order within a file is kept."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture
def mcore_cpu():
    """A 1-rank gloo group with megatron-core parallel state (TP=1), torn down afterwards."""
    from megatron_tinyllama.parallel.cpu_shim import single_rank_cpu

    with single_rank_cpu(tensor_parallel_size=1, seed=1234):
        yield


def train_llama_style_spm(out_dir: Path, vocab_size: int = 512) -> Path:
    """A small sentencepiece BPE model with Llama's settings (ids unk=0, bos=1, eos=2)."""
    import pydoc_data.topics
    import sentencepiece as spm

    corpus = out_dir / "spm_corpus.txt"
    corpus.write_text("\n".join(list(pydoc_data.topics.topics.values())[:120]))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "tok"), vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2, num_threads=1,
    )
    return out_dir / "tok.model"


@pytest.fixture(scope="session")
def llama_spm(tmp_path_factory) -> Path:
    return train_llama_style_spm(tmp_path_factory.mktemp("spm"))



@pytest.fixture(scope="session")
def testbed_models() -> dict[str, int]:
    """Released parameter count per open_lm shape, from the testbed copy shipped in the package."""
    import json

    from megatron_tinyllama.scaling.runs import find_testbed_dir

    counts = {}
    for path in sorted((find_testbed_dir() / "models").glob("*.json")):
        hyper = json.loads(path.read_text())["hyperparameters"]
        shape = Path(hyper["model"]).stem if "/" in hyper["model"] else hyper["model"]
        counts[shape] = hyper["params"]
    return counts
