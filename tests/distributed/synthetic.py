"""A deterministic stand-in for the data loader: sample i is a fixed learnable sequence."""

from __future__ import annotations

import torch


def synthetic_sample(index: int, seq_length: int, vocab: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(index)
    start = torch.randint(0, vocab, (1,), generator=gen).item()
    step = torch.randint(1, 4, (1,), generator=gen).item()
    return (start + step * torch.arange(seq_length + 1)) % vocab  # learnable: arithmetic runs


def synthetic_batches(data_cfg, *, seq_length, micro_batch_size, dp_rank, dp_size, consumed_samples,
                      seed, global_batch_size_at, num_samples, vocab_size=None):
    """Same contract as build_train_batches: this rank's contiguous slice of each global batch
    (ids are below 64, so ``vocab_size`` needs no check)."""
    consumed = consumed_samples
    while True:
        gbs = global_batch_size_at if isinstance(global_batch_size_at, int) else global_batch_size_at(consumed)
        per_rank = gbs // dp_size
        first = consumed + dp_rank * per_rank
        for offset in range(0, per_rank, micro_batch_size):
            samples = torch.stack([synthetic_sample(first + offset + j, seq_length)
                                   for j in range(micro_batch_size)])
            yield {"tokens": samples[:, :-1], "labels": samples[:, 1:],
                   "loss_mask": torch.ones(micro_batch_size, seq_length)}
        consumed += gbs
