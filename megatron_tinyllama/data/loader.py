"""Indexed datasets -> this data-parallel rank's micro-batches: packed, blended, resumable.

This module owns turning ``DataConfig`` plus batch geometry into batches for the trainer.

**Samples.** A sample is ``seq_length + 1`` consecutive tokens of one dataset, packed across
document boundaries (``tokens`` = the first ``seq_length``, ``labels`` = the last ``seq_length``,
``loss_mask`` all ones: there is no padding). We reuse megatron-core's ``GPTDataset`` for this:
it shuffles documents, builds the sample index with its compiled C++ helper
(``megatron.core.datasets.helpers_cpp``, shipped compiled in the megatron-core wheels; we compile
it once if it is missing) and caches the index arrays as ``.npy`` files. We subclass it so that a
cache is keyed on the dataset's contents (:func:`.indexed.dataset_fingerprint`; megatron-core
keys it on the path, so a prefix preprocessed again would train on the old sample index and then
fail with an IndexError) and appears atomically (built in a temporary folder, then renamed),
because an interrupted build would otherwise leave files that the next run loads as complete.

**Blend.** Global sample ``i`` comes from the dataset and position that
:class:`.blend.BlendSchedule` assigns from ``(seed, i)`` alone (weights may move with tokens
consumed, ``DataConfig.mixture_warmup``). megatron-core's ``BlendedDataset`` and
``BlendedMegatronDatasetBuilder`` are not used: the former takes one fixed weight vector, and
the latter sizes datasets from fixed weights and coordinates cache building only through
``torch.distributed`` (rank 0 first, then a barrier), with non-atomic writes.

**Epochs.** A dataset read more than once is one ``GPTDataset`` per epoch, each exactly one
epoch long, epoch ``e`` shuffled with a seed derived from ``(seed, e)`` (epoch 0 with ``seed``
itself). megatron-core sizes one ``GPTDataset`` for the samples requested and shuffles documents
and samples over all its epochs together, so the order of every sample depended on the run's
length: changing ``train.train_tokens`` on resume reshuffled what earlier steps had read once a
run spanned two epochs. Here position ``p`` of a dataset is sample ``p mod E`` of epoch ``p div E``
whatever the run's length, and training longer only appends epochs. (The last partial sample of
each epoch, fewer than ``seq_length + 1`` tokens, is not read.)

**Ranks and resume.** An optimizer step consumes the global samples
``[consumed, consumed + gbs)``. Data-parallel rank ``r`` takes the contiguous slice
``[consumed + r * gbs / dp, consumed + (r + 1) * gbs / dp)`` and yields it as micro-batches in
order. Ranks are disjoint and together cover every sample for any world size; starting at any
``consumed_samples`` yields exactly what an uninterrupted run would have from there, including
when the global batch size changes over the run.

**Index caches.** Built once per cache folder: under ``torch.distributed`` global rank 0 builds
while holding a file lock, then all ranks pass a barrier and load (the folder must be shared by
the ranks, as megatron-core also assumes); without it, every process takes the file lock in turn
and the first one builds. ``build_train_batches``/``build_valid_batches`` are therefore
collective when ``torch.distributed`` is initialised.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from megatron_tinyllama.config import DataConfig
from megatron_tinyllama.data.blend import BlendSchedule, parse_blend
from megatron_tinyllama.data.indexed import (IndexFormatError, dataset_exists, dataset_fingerprint,
                                             read_index)
from megatron_tinyllama.data.provenance import TokenIdError

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
GlobalBatchSize = Union[int, Callable[[int], int]]


# ---------------------------------------------------------------------------------------------
# megatron-core GPTDataset, built once per cache folder.


class _TokenizerStub:
    """What GPTDatasetConfig needs of a tokenizer when nothing is tokenized online.

    Samples are already token ids; the EOD id only matters for EOD masking or position resets,
    which we leave off, and the pad id is absent so that no real token is masked as padding.
    """

    vocab_size = None
    eod = -1
    unique_identifiers = {"class": "megatron_tinyllama.data.loader", "online": False}


def _ensure_helpers() -> None:
    """Import megatron-core's compiled dataset helpers, compiling them once if absent."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
        return
    except ImportError:
        pass
    import megatron.core.datasets as datasets_pkg

    folder = os.path.dirname(datasets_pkg.__file__)
    with _file_lock(os.path.join(tempfile.gettempdir(), "megatron_tinyllama_helpers.lock")):
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401  (built meanwhile)
            return
        except ImportError:
            result = subprocess.run(["make", "-C", folder], capture_output=True, text=True)
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        raise RuntimeError(
            f"megatron-core's dataset helpers (helpers_cpp) are missing and `make -C {folder}` "
            f"failed (needs a C++ compiler and pybind11):\n{result.stdout}{result.stderr}"
        ) from None


@contextmanager
def _file_lock(path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _gpt_dataset_class():
    from megatron.core.datasets.gpt_dataset import GPTDataset

    class CachedGPTDataset(GPTDataset):
        """GPTDataset whose .npy index cache is keyed on the dataset's contents and appears
        atomically (see the module docstring)."""

        def __init__(self, *args, fingerprint: str, **kwargs) -> None:
            self._fingerprint = fingerprint
            super().__init__(*args, **kwargs)

        def _key_on_contents(self) -> None:
            # megatron-core names the cache after the path and the config only, so a prefix that
            # was preprocessed again would load the old contents' sample index. Add the contents.
            if self.unique_identifiers.get("dataset_fingerprint") == self._fingerprint:
                return
            self.unique_identifiers["dataset_fingerprint"] = self._fingerprint
            self.unique_description = json.dumps(self.unique_identifiers, indent=4,
                                                 default=lambda obj: obj.unique_identifiers)
            self.unique_description_hash = hashlib.md5(self.unique_description.encode("utf-8"),
                                                       usedforsecurity=False).hexdigest()

        def _build_document_sample_shuffle_indices(self):
            self._key_on_contents()
            cache = self.config.path_to_cache
            base = f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}"
            names = [f"{base}-{affix}" for affix in ("document_index.npy", "sample_index.npy",
                                                     "shuffle_index.npy", "description.txt")]
            if all(os.path.isfile(os.path.join(cache, name)) for name in names):
                return super()._build_document_sample_shuffle_indices()
            scratch = tempfile.mkdtemp(prefix=".build-", dir=cache)
            final_config = self.config
            self.config = copy.copy(final_config)
            self.config.path_to_cache = scratch
            try:
                indices = super()._build_document_sample_shuffle_indices()
                for name in names:  # the description last: megatron checks for all four
                    os.replace(os.path.join(scratch, name), os.path.join(cache, name))
            finally:
                self.config = final_config
                shutil.rmtree(scratch, ignore_errors=True)
            return indices

    return CachedGPTDataset


def _gpt_config(seq_length: int, seed: int, cache_dir: str, prefix: str):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    wanted = dict(
        random_seed=seed, sequence_length=seq_length, blend=([prefix], None), split="1,0,0",
        path_to_cache=cache_dir, tokenizer=_TokenizerStub(), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        mmap_bin_files=True, add_extra_token_to_sequence=True,
    )
    # Keep to fields this megatron-core version has (0.16 to 0.19 tested for these names).
    known = {f.name for f in dataclasses.fields(GPTDatasetConfig) if f.init}
    return GPTDatasetConfig(**{k: v for k, v in wanted.items() if k in known})


def epoch_seed(seed: int, epoch: int) -> int:
    """Shuffle seed of ``epoch`` of a dataset: ``seed`` for the first, then derived from both
    (a 32-bit value, as numpy's RandomState in megatron-core requires)."""
    if epoch == 0:
        return seed
    return int(np.random.SeedSequence([seed, epoch, 0x65706F6368]).generate_state(1, np.uint32)[0])


class EpochSamples:
    """A dataset read over several epochs: position ``p`` is sample ``p % E`` of epoch ``p // E``.

    Every epoch is its own one-epoch ``GPTDataset`` (see the module docstring), so position ``p``
    does not depend on how many epochs exist.
    """

    def __init__(self, epochs: Sequence) -> None:
        self.epochs = list(epochs)
        self.samples_per_epoch = len(self.epochs[0])

    def __len__(self) -> int:
        return self.samples_per_epoch * len(self.epochs)

    def __getitem__(self, position: int):
        epoch, within = divmod(int(position), self.samples_per_epoch)
        if not 0 <= epoch < len(self.epochs):
            raise IndexError(f"position {position} past the {len(self)} samples built")
        return self.epochs[epoch][within]


def build_gpt_datasets(prefixes: Sequence[str], num_samples: Sequence[int], *, seq_length: int,
                       seed: int, cache_dir: str, split: str = "train") -> list:
    """One :class:`EpochSamples` per prefix, with at least ``num_samples[k]`` samples.

    A dataset needing 0 samples is not built (``None`` in its place). Collective under an
    initialised ``torch.distributed`` (see the module docstring).

    Args:
        prefixes: Indexed dataset prefixes.
        num_samples: Samples needed from each.
        seq_length: Tokens per sample (each holds seq_length + 1).
        seed: Shuffle seed.
        cache_dir: Folder for the index caches.
        split: ``"train"`` or ``"valid"`` (part of the cache key).
    """
    from megatron.core.datasets.utils import Split

    for prefix, needed in zip(prefixes, num_samples):
        if not dataset_exists(prefix):
            raise FileNotFoundError(f"{prefix}: no indexed dataset (.bin/.idx) here")
        if needed and read_index(prefix).num_tokens == 0:
            raise ValueError(f"{prefix}: dataset holds no tokens")
    _ensure_helpers()
    os.makedirs(cache_dir, exist_ok=True)
    cls = _gpt_dataset_class()

    def build() -> list:
        datasets = []
        for prefix, needed in zip(prefixes, num_samples):
            if not needed:
                datasets.append(None)
                continue
            fingerprint = dataset_fingerprint(prefix)
            low = cls.build_low_level_dataset(prefix, _gpt_config(seq_length, seed, cache_dir, prefix))
            docs = np.arange(low.sequence_lengths.shape[0], dtype=np.int32)

            def one_epoch(epoch: int):
                # num_samples=None: exactly one epoch, keyed (and cached) independently of the
                # run's length.
                config = _gpt_config(seq_length, epoch_seed(seed, epoch), cache_dir, prefix)
                return cls(low, prefix, docs, None, Split[split], config, fingerprint=fingerprint)

            epochs = [one_epoch(0)]
            per_epoch = len(epochs[0])
            if per_epoch == 0:
                raise ValueError(f"{prefix}: {int(low.sequence_lengths.sum())} tokens do not make one "
                                 f"sample of seq_length + 1 = {seq_length + 1} tokens")
            epochs += [one_epoch(e) for e in range(1, -(-int(needed) // per_epoch))]
            datasets.append(EpochSamples(epochs))
        return datasets

    lock = os.path.join(cache_dir, ".build.lock")
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not dist:
        with _file_lock(lock):
            return build()
    rank = torch.distributed.get_rank()
    datasets = None
    if rank == 0:
        with _file_lock(lock):
            datasets = build()
    torch.distributed.barrier()
    return datasets if rank == 0 else build()


# ---------------------------------------------------------------------------------------------
# Sample plan: which global samples each rank reads, micro-batch by micro-batch.


def global_batches(consumed_samples: int, num_samples: int,
                   global_batch_size_at: GlobalBatchSize, *, dp_size: int,
                   micro_batch_size: int) -> Iterator[tuple[int, int]]:
    """(first global sample, global batch size) of each optimizer step from consumed_samples.

    Stops before a step that would pass ``num_samples``.
    """
    consumed = consumed_samples
    while True:
        gbs = global_batch_size_at(consumed) if callable(global_batch_size_at) \
            else global_batch_size_at
        if gbs <= 0 or gbs % (dp_size * micro_batch_size):
            raise ValueError(f"global batch size {gbs} at sample {consumed} is not a positive "
                             f"multiple of dp_size * micro_batch_size = "
                             f"{dp_size} * {micro_batch_size}")
        if consumed + gbs > num_samples:
            return
        yield consumed, gbs
        consumed += gbs


def micro_batch_sample_indices(consumed_samples: int, num_samples: int,
                               global_batch_size_at: GlobalBatchSize, *, dp_rank: int,
                               dp_size: int, micro_batch_size: int) -> Iterator[np.ndarray]:
    """Global sample indices of each micro-batch this rank reads, in order.

    Rank ``r`` reads the contiguous ``r``-th of ``dp_size`` equal slices of every global batch.
    """
    _check_rank(dp_rank, dp_size)
    for start, gbs in global_batches(consumed_samples, num_samples, global_batch_size_at,
                                     dp_size=dp_size, micro_batch_size=micro_batch_size):
        first = start + dp_rank * (gbs // dp_size)
        for k in range(gbs // dp_size // micro_batch_size):
            yield np.arange(first + k * micro_batch_size, first + (k + 1) * micro_batch_size)


def _check_rank(dp_rank: int, dp_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} outside [0, dp_size={dp_size})")


def _train_plan(schedule: BlendSchedule, consumed_samples: int, num_samples: int,
                global_batch_size_at: GlobalBatchSize, dp_rank: int, dp_size: int,
                micro_batch_size: int) -> Iterator[list[tuple[int, int]]]:
    """(dataset, position) pairs of each micro-batch of this rank."""
    counts = schedule.counts_before(consumed_samples)
    for start, gbs in global_batches(consumed_samples, num_samples, global_batch_size_at,
                                     dp_size=dp_size, micro_batch_size=micro_batch_size):
        dataset, position = schedule.assign(start, start + gbs, counts)
        counts = counts + np.bincount(dataset, minlength=schedule.num_datasets)
        first = dp_rank * (gbs // dp_size)
        for k in range(gbs // dp_size // micro_batch_size):
            window = slice(first + k * micro_batch_size, first + (k + 1) * micro_batch_size)
            yield list(zip(dataset[window].tolist(), position[window].tolist()))


# ---------------------------------------------------------------------------------------------
# Batches.


class BlendedSamples(torch.utils.data.Dataset):
    """Map-style dataset over (dataset, position) keys, returning the trainer's sample dict.

    With ``vocab_size``, every sample's ids are checked to lie in ``[0, vocab_size)`` (one min/max
    over seq_length + 1 integers, negligible next to a forward pass): an id past the embedding
    is otherwise a bare IndexError on CPU and a device-side assert on GPU, or, below the
    TP-padded size, no error at all.
    """

    def __init__(self, datasets: Sequence, prefixes: Sequence[str] = (),
                 vocab_size: Optional[int] = None) -> None:
        self.datasets = list(datasets)
        self.prefixes = list(prefixes)
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets if d is not None)

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        dataset, position = key
        sample = self.datasets[dataset][position]
        tokens, labels = sample["tokens"], sample["labels"]
        if self.vocab_size is not None:
            low, high = (int(v) for v in torch.aminmax(tokens))
            low, high = min(low, int(labels[-1])), max(high, int(labels[-1]))
            if low < 0 or high >= self.vocab_size:
                raise TokenIdError(
                    f"{self.prefixes[dataset]}: sample {position} holds token id "
                    f"{high if high >= self.vocab_size else low}, outside the model's vocabulary "
                    f"[0, {self.vocab_size}) (model.vocab_size): the dataset was tokenized with "
                    f"a bigger tokenizer, or merges datasets from different tokenizers")
        return {"tokens": tokens, "labels": labels,
                "loss_mask": sample["loss_mask"].to(torch.float32)}


def _collate(samples: list[Batch]) -> Batch:
    return {key: torch.stack([s[key] for s in samples])
            for key in ("tokens", "labels", "loss_mask")}


def loader_settings(data_cfg: DataConfig, num_workers: Optional[int] = None) -> tuple[int, bool]:
    """(workers, pin_memory) with the recipe's 'auto' (None) resolved for this machine."""
    cuda = torch.cuda.is_available()
    workers = num_workers if num_workers is not None else data_cfg.num_workers
    workers = (2 if cuda else 0) if workers is None else workers
    pin = cuda if data_cfg.pin_memory is None else bool(data_cfg.pin_memory and cuda)
    return workers, pin


def _batches(samples: BlendedSamples, plan: Iterator[list[tuple[int, int]]],
             num_workers: int, pin_memory: bool = False) -> Iterator[Batch]:
    if num_workers <= 0:
        for keys in plan:
            batch = _collate([samples[key] for key in keys])
            yield {k: v.pin_memory() for k, v in batch.items()} if pin_memory else batch
        return
    # Workers read and collate ahead (prefetch_factor batches each) while the GPU computes; the
    # pinned batches then copy to the device without blocking the training process.
    loader = torch.utils.data.DataLoader(samples, batch_sampler=plan, num_workers=num_workers,
                                         collate_fn=_collate, pin_memory=pin_memory, prefetch_factor=4)
    yield from loader


def _resolve(data_cfg: DataConfig, blend: Sequence[str],
             seed: int) -> tuple[list[str], list[float], str, int]:
    """(prefixes, weights, cache folder, effective seed) of a blend."""
    prefixes, weights = parse_blend(blend)
    if weights is None:  # Megatron: unweighted datasets blend in proportion to their size
        weights = [float(read_index(p).num_tokens) for p in prefixes] if len(prefixes) > 1 \
            else [1.0]
    cache_dir = data_cfg.cache_dir or os.path.join(
        os.path.dirname(os.path.abspath(prefixes[0])), "index_cache")
    return prefixes, weights, cache_dir, (data_cfg.seed if data_cfg.seed is not None else seed)


def check_datasets_exist(data_cfg: DataConfig) -> None:
    """Fail before any heavy set-up when a dataset of the recipe is missing or holds no tokens.

    A dataset with no tokens and a positive weight cannot give a sample. For ``data.blend`` the
    loader would say so at start anyway, but ``data.valid_blend`` is only read at the first
    evaluation: after training steps and, on every restart, after the last checkpoint.

    Raises:
        ConfigError: naming the field and the prefix without ``.bin``/``.idx``, or with no tokens.
    """
    from megatron_tinyllama.config import ConfigError

    blends = [(name, *parse_blend(getattr(data_cfg, name)))
              for name in ("blend", "valid_blend") if getattr(data_cfg, name)]
    for name, prefixes, _ in blends:
        for prefix in prefixes:
            if not dataset_exists(prefix):
                raise ConfigError(f"data.{name}: {prefix} has no indexed dataset (.bin/.idx)")
    for name, prefixes, weights in blends:
        for k, prefix in enumerate(prefixes):
            if weights is not None and weights[k] == 0:
                continue  # never drawn from
            try:
                index = read_index(prefix)
            except IndexFormatError as err:
                raise ConfigError(f"data.{name}: {err}") from None
            if index.num_tokens == 0:
                raise ConfigError(
                    f"data.{name}: {prefix} holds no tokens ({index.num_documents} documents, all "
                    "empty): nothing to read samples from; preprocess it again or drop it")


def build_train_batches(data_cfg: DataConfig, *, seq_length: int, micro_batch_size: int,
                        dp_rank: int, dp_size: int, consumed_samples: int, seed: int,
                        global_batch_size_at: GlobalBatchSize, num_samples: int,
                        num_workers: Optional[int] = None,
                        vocab_size: Optional[int] = None) -> Iterator[Batch]:
    """This DP rank's training micro-batches, from ``consumed_samples`` on.

    Each item is ``{'tokens': int64 [mb, seq], 'labels': int64 [mb, seq], 'loss_mask':
    float32 [mb, seq]}``; labels are the tokens shifted by one. Datasets are built (or their
    caches loaded) before this returns; collective under ``torch.distributed``.

    Args:
        data_cfg: ``blend`` (Megatron-style weighted prefixes), optional ``mixture_warmup``,
            ``cache_dir``, ``seed`` (overrides ``seed`` when set), ``num_workers``.
        seq_length: Tokens per sample.
        micro_batch_size: Samples per micro-batch.
        dp_rank: This rank's data-parallel index.
        dp_size: Data-parallel world size.
        consumed_samples: Global samples consumed before this point (0 for a fresh run).
        seed: Data seed (used when ``data_cfg.seed`` is None).
        global_batch_size_at: Samples per optimizer step, or a function of consumed samples.
        num_samples: Samples the whole run needs; datasets get the epochs it takes, and
            iteration stops before a step that would pass it. The order of the samples does not
            depend on it: a larger value on resume (training longer) extends the order.
        num_workers: DataLoader workers (default ``data_cfg.num_workers``; None there is 'auto',
            see :func:`loader_settings`, which also decides ``pin_memory``).
        vocab_size: ``model.vocab_size``; when given, a sample holding an id outside
            ``[0, vocab_size)`` raises :class:`.provenance.TokenIdError` naming its dataset.

    Returns:
        An iterator of micro-batches.
    """
    if not data_cfg.blend:
        raise ValueError("data.blend is empty: name at least one dataset prefix")
    _check_rank(dp_rank, dp_size)
    prefixes, weights, cache_dir, seed = _resolve(data_cfg, data_cfg.blend, seed)
    warmup = data_cfg.mixture_warmup
    schedule = BlendSchedule(
        tuple(weights), seq_length, seed,
        start_weights=tuple(warmup.start_weights) if warmup and warmup.start_weights else None,
        warmup_start_tokens=(warmup.start_tokens or 0) if warmup else 0,  # None: from sample 0
        warmup_tokens=warmup.warmup_tokens if warmup else 0)
    needed = schedule.counts_before(num_samples)
    datasets = build_gpt_datasets(prefixes, needed.tolist(), seq_length=seq_length, seed=seed,
                                  cache_dir=cache_dir, split="train")
    plan = _train_plan(schedule, consumed_samples, num_samples, global_batch_size_at, dp_rank,
                       dp_size, micro_batch_size)
    workers, pin = loader_settings(data_cfg, num_workers)
    logger.info("data loader: %d worker(s), %s memory", workers, "pinned" if pin else "pageable")
    return _batches(BlendedSamples(datasets, prefixes, vocab_size), plan, workers, pin)


def build_valid_batches(data_cfg: DataConfig, *, seq_length: int, micro_batch_size: int,
                        dp_rank: int, dp_size: int, num_samples: int, seed: int,
                        vocab_size: Optional[int] = None) -> Iterator[Batch]:
    """This DP rank's share of a fixed set of held-out samples from ``data_cfg.valid_blend``.

    The same samples come back on every call. ``num_samples`` is rounded down to a multiple of
    ``dp_size * micro_batch_size``; rank ``r`` reads the ``r``-th contiguous slice. Same dict
    format and ``vocab_size`` check as :func:`build_train_batches`; collective under
    ``torch.distributed``.
    """
    if not data_cfg.valid_blend:
        raise ValueError("data.valid_blend is empty: validation has no data")
    _check_rank(dp_rank, dp_size)
    usable = num_samples - num_samples % (dp_size * micro_batch_size)
    if usable <= 0:
        raise ValueError(f"{num_samples} validation samples do not fill one micro-batch per rank "
                         f"({dp_size} x {micro_batch_size})")
    prefixes, weights, cache_dir, seed = _resolve(data_cfg, data_cfg.valid_blend, seed)
    schedule = BlendSchedule(tuple(weights), seq_length, seed)
    datasets = build_gpt_datasets(prefixes, schedule.counts_before(usable).tolist(),
                                  seq_length=seq_length, seed=seed, cache_dir=cache_dir,
                                  split="valid")
    plan = _train_plan(schedule, 0, usable, usable, dp_rank, dp_size, micro_batch_size)
    return _batches(BlendedSamples(datasets, prefixes, vocab_size), plan, 0)
