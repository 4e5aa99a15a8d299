"""Our model-weights checkpoint: one safetensors file per TP rank plus the model config.

Layout of a model directory::

    tinyllama_model.json               {"format_version", "model": ModelConfig, "tensor_parallel_size"}
    model-tp00-of-02.safetensors       rank 0's megatron-core state (no optimizer)
    model-tp01-of-02.safetensors

The HF converter writes and reads it, ``checkpoint.init_from`` starts training from it, and
checkpoints written before per-rank files carry one as ``model/`` (checkpoint.per_rank reads the
same tensors from a per-rank training checkpoint). Directories
are written under a temporary name and renamed when complete, so a crash never leaves a directory
that looks finished.

Every file written here and by the trainer's checkpoint save goes through :func:`writing`, so a
full disk or another OS error names the file and the errno (``ENOSPC``) instead of torch's
"basic_ios::clear: iostream error" or safetensors' message without a path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megatron_tinyllama.checkpoint.hf import ConversionError
from megatron_tinyllama.config import ModelConfig

MODEL_INDEX = "tinyllama_model.json"
FORMAT_VERSION = 1


def shard_filename(tp_rank: int, tp_size: int) -> str:
    return f"model-tp{tp_rank:02d}-of-{tp_size:02d}.safetensors"


def deal_largest_first(sizes: list[int], count: int) -> list[int]:
    """The owner (0 .. count-1) of each item: largest first to the least loaded, ties by position.
    Deterministic, so every rank computes the same deal from the same list (who writes which
    tensor, who hashes which piece of a file)."""
    load, owner = [0] * count, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner[i] = min(range(count), key=lambda r: (load[r], r))
        load[owner[i]] += sizes[i]
    return owner


class CheckpointWriteError(OSError):
    """Writing a checkpoint file failed (disk full, quota, I/O error): names the file and errno."""


@contextlib.contextmanager
def writing(path: Union[str, Path]) -> Iterator[None]:
    """Turn a failure while writing ``path`` into a :class:`CheckpointWriteError` naming it.

    An ``OSError`` keeps its errno (``ENOSPC: No space left on device``); torch's and safetensors'
    own errors carry none, so their text is kept. The free space of the folder is added: it tells
    a full disk from another fault.
    """
    try:
        yield
    except CheckpointWriteError:
        raise
    except OSError as err:
        code = errno.errorcode.get(err.errno, f"errno {err.errno}") if err.errno else "I/O error"
        raise CheckpointWriteError(f"{path}: {code}: {err.strerror or err} "
                                   f"({_free_space(path)})") from err
    except (RuntimeError, SafetensorError) as err:
        raise CheckpointWriteError(f"{path}: writing failed: {err} ({_free_space(path)})") from err


def _free_space(path: Union[str, Path]) -> str:
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        return "free space unknown"
    return f"{free:,} bytes free there"


class _WholeWrites(io.FileIO):
    """A file whose ``write`` writes everything or raises, and keeps the first ``OSError``.

    torch's zip writer ignores a short write and, given a Python file, turns the ``OSError`` of
    a full disk into "unexpected pos 704 vs 598"; the kept error restores the errno.
    """

    first_error: Optional[OSError] = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        try:
            while view:
                view = view[super().write(view):]
        except OSError as err:
            self.first_error = self.first_error or err
            raise
        return total


def save_torch_file(obj, path: Union[str, Path], **kwargs) -> None:
    """``torch.save`` that reports a failed write as ``OSError`` with its errno, via
    :func:`writing` (given a path, torch's C++ writer says only "basic_ios::clear: iostream
    error" or "unexpected pos")."""
    with writing(path), _WholeWrites(path, "wb") as handle:
        try:
            torch.save(obj, handle, **kwargs)
        except Exception:
            if handle.first_error is not None:
                raise handle.first_error from None
            raise
        if handle.first_error is not None:  # swallowed on the way: the file is not whole
            raise handle.first_error


def clean_state(state: dict) -> dict[str, torch.Tensor]:
    """Tensors only (megatron-core adds ``_extra_state`` entries for TE compatibility), contiguous."""
    return {k: v.detach().contiguous() for k, v in state.items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


@contextlib.contextmanager
def atomic_directory(final: Union[str, Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``final`` only if the block succeeds.

    Raises:
        FileExistsError: ``final`` exists and ``overwrite`` is False.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model_files(directory: Path, model_cfg: ModelConfig, tp_rank: int, tp_size: int,
                      state: dict[str, torch.Tensor]) -> None:
    """Write one TP rank's weights (and, from rank 0, the index) into an existing directory."""
    shard = directory / shard_filename(tp_rank, tp_size)
    with writing(shard):
        save_file(clean_state(state), str(shard), metadata={"format": "pt"})
    if tp_rank == 0:
        write_model_index(directory, model_cfg, tp_size)


def write_model_index(directory: Path, model_cfg: ModelConfig, tp_size: int) -> None:
    index = {"format_version": FORMAT_VERSION, "model": dataclasses.asdict(model_cfg),
             "tensor_parallel_size": tp_size}
    with writing(directory / MODEL_INDEX):
        (directory / MODEL_INDEX).write_text(json.dumps(index, indent=2))


def save_model_checkpoint(directory: Union[str, Path], model_cfg: ModelConfig,
                          shards: list[dict[str, torch.Tensor]], overwrite: bool = False) -> Path:
    """Write all TP shards from one process (converter use)."""
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        for rank, state in enumerate(shards):
            write_model_files(tmp, model_cfg, rank, len(shards), state)
    return Path(directory)


def read_model_index(directory: Union[str, Path]) -> tuple[ModelConfig, int]:
    """The model config and TP degree of a model directory.

    Raises:
        ConversionError: no index, or an index that is not ours.
    """
    path = Path(directory) / MODEL_INDEX
    if not path.is_file():
        raise ConversionError(f"{directory}: not a model checkpoint (no {MODEL_INDEX})")
    try:
        index = json.loads(path.read_text())
        model_cfg = ModelConfig(**index["model"])
        tp_size = int(index["tensor_parallel_size"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConversionError(f"{path}: unreadable model index ({err})") from None
    return model_cfg, tp_size


def load_model_shard(directory: Union[str, Path], tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """One TP rank's tensors.

    Raises:
        ConversionError: the file is missing, truncated or not safetensors (named).
    """
    path = Path(directory) / shard_filename(tp_rank, tp_size)
    if not path.is_file():
        raise ConversionError(f"{directory}: missing {path.name}")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types, unnamed
        raise ConversionError(f"{path}: unreadable model shard, truncated or corrupt "
                              f"({type(err).__name__}: {err})") from None


def load_model_checkpoint(directory: Union[str, Path]) -> tuple[ModelConfig, list[dict[str, torch.Tensor]]]:
    """All TP shards and the config of a model directory."""
    model_cfg, tp_size = read_model_index(directory)
    return model_cfg, [load_model_shard(directory, r, tp_size) for r in range(tp_size)]


def load_into_model(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "") -> None:
    """Copy a rank's weights into a built model; every parameter must be covered, shapes equal.

    Raises:
        ConversionError: a missing, unexpected or mis-shaped tensor (named).
    """
    own = clean_state(model.state_dict())
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConversionError(f"{source}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ConversionError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=False)
