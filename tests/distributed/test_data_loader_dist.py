"""Loader under several processes: caches built once, ranks disjoint, with and without torch.distributed."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from tests.distributed.ranks import run_on_ranks

pytestmark = pytest.mark.distributed

SEQ = 16


def _write(prefix, base: int, n_docs: int, seed: int) -> None:
    from megatron_tinyllama.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 40, size=n_docs)
    tokens = np.concatenate([np.arange(base, base + n) for n in lengths]) + seed
    with IndexedDatasetWriter(str(prefix), np.uint16) as writer:
        writer.add_documents(tokens, lengths)


def _corpus(root):
    _write(root / "a_document", 1000, 300, 1)
    _write(root / "b_document", 30000, 200, 2)
    return f"0.6 {root}/a_document 0.4 {root}/b_document"


def _tokens(root, blend, dp_rank: int, dp_size: int) -> torch.Tensor:
    from megatron_tinyllama.config import DataConfig
    from megatron_tinyllama.data.loader import build_train_batches

    batches = build_train_batches(
        DataConfig(blend=blend, cache_dir=str(root / "cache")), seq_length=SEQ, micro_batch_size=2,
        dp_rank=dp_rank, dp_size=dp_size, consumed_samples=0, seed=3, global_batch_size_at=8,
        num_samples=160)
    return torch.cat([b["tokens"] for b in batches])


def _rank_main(rank: int, world_size: int, root, blend) -> None:
    torch.save(_tokens(root, blend, rank, world_size), root / f"rank{rank}.pt")


def _process_main(index: int, root, blend) -> None:
    torch.save(_tokens(root, blend, 0, 1), root / f"proc{index}.pt")


def _cache_files(root):
    names = sorted(p.name for p in (root / "cache").iterdir())
    assert not [n for n in names if n.startswith(".build-")]
    return [n for n in names if not n.startswith(".")]


def test_gloo_ranks_build_the_cache_once_and_read_disjoint_slices(tmp_path):
    blend = _corpus(tmp_path)
    run_on_ranks(_rank_main, 2, tmp_path, blend)
    assert len(_cache_files(tmp_path)) == 8  # 4 files per dataset, each written once
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _tokens(tmp_path, blend, 0, 1)  # cache hit in this process
    rebuilt = torch.cat([ranks[r][s * 4:(s + 1) * 4] for s in range(160 // 8) for r in range(2)])
    assert torch.equal(rebuilt, single)


def test_independent_processes_share_one_cache_safely(tmp_path):
    blend = _corpus(tmp_path)
    from tests.distributed.ranks import process_context

    context = process_context()  # fresh processes (forked from the preloaded forkserver), no shared group
    procs = [context.Process(target=_process_main, args=(i, tmp_path, blend)) for i in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert len(_cache_files(tmp_path)) == 8
    assert torch.equal(torch.load(tmp_path / "proc0.pt"), torch.load(tmp_path / "proc1.pt"))
