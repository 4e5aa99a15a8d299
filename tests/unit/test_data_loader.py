"""Training batches: packing, blend proportions, rank disjointness, exact resume, caches."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megatron_tinyllama.config import DataConfig, MixtureWarmupConfig
from megatron_tinyllama.data.indexed import IndexedDatasetWriter
from megatron_tinyllama.data.loader import (build_train_batches, build_valid_batches,
                                            micro_batch_sample_indices)

SEQ = 16
# Dataset A's documents hold token ids in [1000, 20000), B's in [30000, 50000): the first token
# of a sample tells which dataset it came from. Within a document ids count up by one, so a
# break in the +1 steps inside a sample is a document boundary.
BASES = {"a": 1000, "b": 30000}


def _write_dataset(prefix, base: int, n_docs: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 40, size=n_docs)
    starts = base + rng.integers(0, 15000, size=n_docs)
    tokens = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)])
    with IndexedDatasetWriter(str(prefix), np.uint16) as writer:
        writer.add_documents(tokens, lengths)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    _write_dataset(root / "a_text_document", BASES["a"], 400, 1)
    _write_dataset(root / "b_code_document", BASES["b"], 300, 2)
    _write_dataset(root / "valid_text_document", BASES["a"], 100, 3)
    return root


def _cfg(corpus, **kwargs) -> DataConfig:
    blend = kwargs.pop("blend", f"0.7 {corpus}/a_text_document 0.3 {corpus}/b_code_document")
    return DataConfig(blend=blend, valid_blend=(f"{corpus}/valid_text_document",),
                      cache_dir=str(corpus / "cache"), **kwargs)


def _batches(corpus, *, dp_rank=0, dp_size=1, consumed=0, gbs=8, num_samples=400, mb=2, seed=5,
             **cfg_kwargs):
    return list(build_train_batches(
        _cfg(corpus, **cfg_kwargs), seq_length=SEQ, micro_batch_size=mb, dp_rank=dp_rank,
        dp_size=dp_size, consumed_samples=consumed, seed=seed, global_batch_size_at=gbs,
        num_samples=num_samples))


def _source(tokens: torch.Tensor) -> np.ndarray:
    return (tokens[:, 0] >= BASES["b"]).numpy().astype(int)


def test_batches_have_the_trainer_format_and_pack_documents_without_padding(corpus):
    batches = _batches(corpus)
    assert len(batches) == 400 // 2
    for batch in batches[:20]:
        assert set(batch) == {"tokens", "labels", "loss_mask"}
        assert batch["tokens"].shape == batch["labels"].shape == (2, SEQ)
        assert batch["tokens"].dtype == batch["labels"].dtype == torch.int64
        assert batch["loss_mask"].dtype == torch.float32 and bool((batch["loss_mask"] == 1).all())
        assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])  # shifted by one
        assert bool((batch["tokens"] >= BASES["a"]).all())  # never a pad or filler id
    steps = torch.cat([b["tokens"] for b in batches]).diff(dim=1)
    assert bool((steps != 1).any(dim=1).float().mean() > 0.3)  # samples span documents


def test_seven_three_blend_measured_over_10k_samples_is_within_one_percent(corpus):
    batches = _batches(corpus, gbs=80, mb=8, num_samples=10_000)
    sources = np.concatenate([_source(b["tokens"]) for b in batches])
    assert sources.shape[0] == 10_000
    assert abs(np.mean(sources == 0) - 0.7) < 0.01


@pytest.mark.parametrize("dp_size", [2, 3, 4])
def test_ranks_are_disjoint_and_together_cover_every_sample(corpus, dp_size):
    gbs, num_samples = 24, 240
    indices = [np.concatenate(list(micro_batch_sample_indices(
        0, num_samples, gbs, dp_rank=r, dp_size=dp_size, micro_batch_size=2))) for r in range(dp_size)]
    together = np.concatenate(indices)
    assert np.array_equal(np.sort(together), np.arange(num_samples))  # disjoint and complete
    # The same holds for the data: per step, ranks 0..dp-1 in order read what one rank reads.
    single = torch.cat([b["tokens"] for b in _batches(corpus, gbs=gbs, num_samples=num_samples)])
    per_rank = [torch.cat([b["tokens"] for b in _batches(corpus, dp_rank=r, dp_size=dp_size,
                                                         gbs=gbs, num_samples=num_samples)])
                for r in range(dp_size)]
    share = gbs // dp_size
    rebuilt = torch.cat([rank[s * share:(s + 1) * share] for s in range(num_samples // gbs)
                         for rank in per_rank])
    assert torch.equal(rebuilt, single)


def test_resume_from_consumed_samples_yields_exactly_the_uninterrupted_batches(corpus):
    def growing(consumed: int) -> int:  # the batch grows mid-run, as in v1.1's cooldown
        return 8 if consumed < 96 else 16

    full = _batches(corpus, gbs=growing, num_samples=400)
    # consumed 0..95 at 8 per step (4 micro-batches of 2), then 16 per step (8 micro-batches)
    for consumed, skipped in [(0, 0), (40, 20), (96, 48), (128, 64)]:
        resumed = _batches(corpus, gbs=growing, consumed=consumed, num_samples=400)
        assert len(resumed) == len(full) - skipped
        for a, b in zip(resumed, full[skipped:]):
            assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])


def test_order_is_deterministic_from_the_seed(corpus):
    first = torch.cat([b["tokens"] for b in _batches(corpus, seed=5)])
    again = torch.cat([b["tokens"] for b in _batches(corpus, seed=5)])
    other = torch.cat([b["tokens"] for b in _batches(corpus, seed=6)])
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_training_longer_extends_the_order_of_samples_already_planned(corpus):
    # Resuming with a larger train.train_tokens asks for more samples. megatron-core's GPTDataset
    # shuffles all its epochs together, so a second epoch used to reorder the first N samples.
    n = 1200  # dataset a (~525 samples an epoch at 70%) is read in its second epoch already
    from megatron_tinyllama.data.indexed import read_index

    assert 0.7 * n > read_index(str(corpus / "a_text_document")).num_tokens // SEQ
    planned = torch.cat([b["tokens"] for b in _batches(corpus, num_samples=n)])
    longer = torch.cat([b["tokens"] for b in _batches(corpus, num_samples=2 * n)])
    assert planned.shape[0] == n and longer.shape[0] == 2 * n
    assert torch.equal(longer[:n], planned)
    # A resume at step k of the longer run reads what the uninterrupted longer run reads.
    resumed = torch.cat([b["tokens"] for b in _batches(corpus, consumed=800, num_samples=2 * n)])
    assert torch.equal(resumed, longer[800:])
    # Each epoch is a new shuffle: epoch 2 of dataset a is not epoch 1 again in the same order.
    a_samples = longer[torch.from_numpy(_source(longer) == 0)]
    per_epoch = (read_index(str(corpus / "a_text_document")).num_tokens - 1) // SEQ
    first, second = a_samples[:per_epoch], a_samples[per_epoch:2 * per_epoch]
    assert second.shape[0] == per_epoch
    assert not torch.equal(first, second)


def test_data_config_seed_overrides_the_passed_seed(corpus):
    cfg = DataConfig(blend=_cfg(corpus).blend, cache_dir=str(corpus / "cache"), seed=5)
    got = list(build_train_batches(cfg, seq_length=SEQ, micro_batch_size=2, dp_rank=0, dp_size=1,
                                   consumed_samples=0, seed=999, global_batch_size_at=8,
                                   num_samples=400))
    expected = _batches(corpus, seed=5)
    assert len(got) == len(expected)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(got, expected))


def test_mixture_warmup_through_the_loader_follows_the_weights(corpus):
    warmup = MixtureWarmupConfig(start_weights=(1.0, 0.0), warmup_tokens=2000 * SEQ)
    batches = _batches(corpus, gbs=40, mb=20, num_samples=4000, mixture_warmup=warmup)
    sources = np.concatenate([_source(b["tokens"]) for b in batches])
    # Weight of A falls linearly from 1.0 to 0.7 over samples 0..2000, then stays at 0.7.
    for start in range(0, 4000, 500):
        expected = float(np.mean(1.0 - 0.3 * np.minimum(np.arange(start, start + 500), 2000) / 2000))
        measured = float(np.mean(sources[start:start + 500] == 0))
        assert abs(measured - expected) < 0.01, (start, measured)


def test_dataloader_workers_give_the_same_batches(corpus):
    plain = _batches(corpus, num_samples=80)
    workers = list(build_train_batches(
        _cfg(corpus), seq_length=SEQ, micro_batch_size=2, dp_rank=0, dp_size=1, consumed_samples=0,
        seed=5, global_batch_size_at=8, num_samples=80, num_workers=1))
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(plain, workers))
    assert len(plain) == len(workers) == 40


def test_validation_batches_are_fixed_and_split_over_ranks(corpus):
    def valid(rank, size):
        return torch.cat([b["tokens"] for b in build_valid_batches(
            _cfg(corpus), seq_length=SEQ, micro_batch_size=2, dp_rank=rank, dp_size=size,
            num_samples=21, seed=5)])

    whole = valid(0, 1)
    assert whole.shape == (20, SEQ) and torch.equal(whole, valid(0, 1))  # 21 rounds down to 20
    halves = [valid(r, 2) for r in range(2)]
    assert halves[0].shape == (10, SEQ) and torch.equal(torch.cat(halves), whole)
    assert bool((whole < BASES["b"]).all())  # held-out set only


def test_index_cache_is_built_once_and_appears_atomically(tmp_path):
    _write_dataset(tmp_path / "x_text_document", BASES["a"], 50, 4)
    cfg = DataConfig(blend=(str(tmp_path / "x_text_document"),))
    run = dict(seq_length=SEQ, micro_batch_size=2, dp_rank=0, dp_size=1, consumed_samples=0,
               seed=1, global_batch_size_at=4, num_samples=40)
    first = list(build_train_batches(cfg, **run))
    cache = tmp_path / "index_cache"  # default: beside the first dataset
    files = sorted(cache.iterdir())
    names = [f.name for f in files if not f.name.startswith(".")]
    assert len(names) == 4 and all("CachedGPTDataset-train" in n for n in names)
    assert [f.name for f in files if f.name.startswith(".build-")] == []
    stamps = {f: f.stat().st_mtime_ns for f in files}
    second = list(build_train_batches(cfg, **run))
    assert {f: f.stat().st_mtime_ns for f in sorted(cache.iterdir())} == stamps
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(first, second))


def test_bad_geometry_and_missing_data_are_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match="multiple of dp_size"):
        _batches(corpus, gbs=10, dp_size=4, mb=2)
    with pytest.raises(ValueError, match="dp_rank"):
        _batches(corpus, dp_rank=2, dp_size=2)
    with pytest.raises(FileNotFoundError, match="no indexed dataset"):
        list(build_train_batches(DataConfig(blend=(str(tmp_path / "missing"),)), seq_length=SEQ,
                                 micro_batch_size=1, dp_rank=0, dp_size=1, consumed_samples=0,
                                 seed=1, global_batch_size_at=1, num_samples=4))
    with pytest.raises(ValueError, match="empty"):
        _batches(corpus, blend=())
    assert os.path.isdir(corpus / "cache")


def test_loader_settings_auto_and_explicit():
    from megatron_tinyllama.config import DataConfig
    from megatron_tinyllama.data.loader import loader_settings

    cuda = torch.cuda.is_available()
    assert loader_settings(DataConfig()) == ((2, True) if cuda else (0, False))
    assert loader_settings(DataConfig(num_workers=3, pin_memory=False)) == (3, False)
    assert loader_settings(DataConfig(num_workers=0), num_workers=1)[0] == 1
    # Pinned memory needs a CUDA device: a CPU run quietly reads pageable batches.
    assert loader_settings(DataConfig(pin_memory=True))[1] == cuda
