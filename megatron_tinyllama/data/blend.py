"""Which dataset each global sample index comes from, with weights that may move over tokens.

This module owns the blend: parsing Megatron-style weighted prefix lists and assigning every
global sample index ``i`` to a dataset and to a position within that dataset.

The dataset of sample ``i`` is a pure function of ``(seed, i)``: a point ``u_i`` of the
golden-ratio (Kronecker) sequence, offset by the seed, falls into the partition of [0, 1) given
by the weights at ``i``. Nothing depends on batch size, world size or where a run resumed, and
counts track the weights closely: over any ``n`` consecutive samples the number drawn from a
dataset is within a few samples of the weights' sum over them (discrepancy O(log n)), so a 7:3
blend measures 0.700 +- 0.001 over 10k samples. Weights are a function of the tokens consumed
(``i * seq_length``), which is how TinyLlama v1.1 raises a domain's share over the first tokens
of a stage (:class:`BlendSchedule` with ``start_weights``).

megatron-core's ``BlendedDataset`` is not used: its index comes from a sequential greedy pass
in C++ with one fixed weight vector, which cannot express weights that change with tokens.
The position within a dataset is the count of earlier samples drawn from it, so each dataset is
read in its own (shuffled, see :mod:`.loader`) order without gaps or repeats.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd
_CHUNK = 1 << 22  # samples per vectorised block


def parse_blend(blend: Union[str, Sequence[str]]) -> tuple[list[str], Optional[list[float]]]:
    """Split a Megatron-style blend into prefixes and weights.

    Args:
        blend: ``("0.7", "a", "0.3", "b")``, the string ``"0.7 a 0.3 b"``, or unweighted
            prefixes ``("a", "b")``.

    Returns:
        (prefixes, weights) with weights None when none were given.

    Raises:
        ValueError: Empty blend, negative weights, or weights summing to zero.
    """
    items = blend.split() if isinstance(blend, str) else [str(item) for item in blend]
    if not items:
        raise ValueError("empty blend: give at least one dataset prefix")
    weights: Optional[list[float]] = None
    prefixes = items
    if len(items) % 2 == 0:
        try:
            weights = [float(w) for w in items[0::2]]
            prefixes = items[1::2]
        except ValueError:
            weights = None
    if weights is not None:
        if any(w < 0 or not np.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"blend weights must be >= 0 with a positive sum: {weights}")
    return [p.strip() for p in prefixes], weights


def _normalised(weights: Sequence[float]) -> np.ndarray:
    array = np.asarray(weights, dtype=np.float64)
    if array.ndim != 1 or (array < 0).any() or array.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum: {list(weights)}")
    return array / array.sum()


@dataclass(frozen=True)
class BlendSchedule:
    """Dataset choice per global sample index.

    Args:
        weights: Target weights, one per dataset (normalised here).
        seq_length: Tokens per sample (sample ``i`` starts at token ``i * seq_length``).
        seed: Data seed.
        start_weights: Weights at the start of the warm-up; None for a fixed blend.
        warmup_start_tokens: Token count at which the warm-up starts (start_weights before it).
        warmup_tokens: Tokens over which weights move linearly from start_weights to weights.
    """

    weights: tuple[float, ...]
    seq_length: int
    seed: int
    start_weights: Optional[tuple[float, ...]] = None
    warmup_start_tokens: int = 0
    warmup_tokens: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(_normalised(self.weights)))
        if self.start_weights is not None:
            if len(self.start_weights) != len(self.weights):
                raise ValueError(f"{len(self.start_weights)} start weights for "
                                 f"{len(self.weights)} datasets")
            object.__setattr__(self, "start_weights", tuple(_normalised(self.start_weights)))
        if self.seq_length < 1 or self.warmup_tokens < 0 or self.warmup_start_tokens < 0:
            raise ValueError("seq_length must be >= 1 and warm-up tokens >= 0")

    @property
    def num_datasets(self) -> int:
        return len(self.weights)

    def weights_at(self, sample_index: np.ndarray) -> np.ndarray:
        """Weights in force at each sample, shape [n, num_datasets] (or [1, K] when fixed)."""
        end = np.asarray(self.weights)[None, :]
        if self.start_weights is None:
            return end
        tokens = np.asarray(sample_index, dtype=np.float64) * self.seq_length
        if self.warmup_tokens > 0:
            progress = np.clip((tokens - self.warmup_start_tokens) / self.warmup_tokens, 0.0, 1.0)
        else:
            progress = (tokens >= self.warmup_start_tokens).astype(np.float64)
        start = np.asarray(self.start_weights)[None, :]
        return start + (end - start) * progress[:, None]

    def _phase(self) -> np.uint64:
        return np.random.SeedSequence([self.seed, 0x626C656E64]).generate_state(1, np.uint64)[0]

    def dataset_index(self, start: int, stop: int) -> np.ndarray:
        """Dataset of each sample in ``[start, stop)`` (int16), a function of (seed, index) only."""
        index = np.arange(start, stop, dtype=np.uint64)
        if self.num_datasets == 1:
            return np.zeros(index.shape[0], dtype=np.int16)
        # Kronecker sequence in exact 64-bit fixed point (wrap-around is the "mod 1").
        point = (index * _GOLDEN + self._phase()) >> np.uint64(11)
        u = point.astype(np.float64) * (1.0 / (1 << 53))
        bounds = np.cumsum(self.weights_at(np.arange(start, stop)), axis=1)[:, :-1]
        return (u[:, None] >= bounds).sum(axis=1).astype(np.int16)

    def counts_before(self, stop: int) -> np.ndarray:
        """Samples drawn from each dataset among indices ``[0, stop)`` (int64).

        Whole blocks of ``2**22`` samples are memoised per schedule, so sizing the datasets for
        a run and then finding where a resume starts cost one pass, not two.
        """
        counts = np.zeros(self.num_datasets, dtype=np.int64)
        full_blocks, rest = divmod(stop, _CHUNK)
        for block in range(full_blocks):
            counts += _block_counts(self, block)
        if rest:
            start = full_blocks * _CHUNK
            counts += np.bincount(self.dataset_index(start, stop), minlength=self.num_datasets)
        return counts

    def _chunk_counts(self, block: int) -> np.ndarray:
        chosen = self.dataset_index(block * _CHUNK, (block + 1) * _CHUNK)
        return np.bincount(chosen, minlength=self.num_datasets)

    def assign(self, start: int, stop: int,
               counts_at_start: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, position within that dataset) of each sample in ``[start, stop)``.

        Args:
            start: First global sample index.
            stop: One past the last.
            counts_at_start: ``counts_before(start)`` if already known (saves a pass).
        """
        counts = self.counts_before(start) if counts_at_start is None else counts_at_start
        chosen = self.dataset_index(start, stop).astype(np.int64)
        position = np.empty(chosen.shape[0], dtype=np.int64)
        for dataset in range(self.num_datasets):
            mask = chosen == dataset
            position[mask] = counts[dataset] + np.arange(int(mask.sum()), dtype=np.int64)
        return chosen, position


@functools.lru_cache(maxsize=4096)
def _block_counts(schedule: BlendSchedule, block: int) -> np.ndarray:
    counts = schedule._chunk_counts(block)
    counts.flags.writeable = False  # shared by every caller
    return counts
