"""Per-rank training checkpoints as a source of model weights, and the names inside them.

This module owns the names of what a per-rank checkpoint (format 2, written by
checkpoint.saving.CheckpointSaver through checkpoint.sharded) stores, and the one-process
reading of its fp32 weights for the tools that want a model, not a training state: the HF
converter, sampling, evaluation and ``checkpoint.init_from``. Its ``read_model_index``,
``load_model_checkpoint`` and ``load_model_shard`` take a model directory (checkpoint.native)
or a per-rank checkpoint directory alike::

    fp32/tp00-of-02/<parameter>       a tensor, flattened; also exp_avg/..., exp_avg_sq/...
    shapes/tp00-of-02                 JSON {parameter: shape} of that TP rank
    rng/rank00003                     torch.save of rank 3's RNG states
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Union

import torch

from megatron_tinyllama.checkpoint import native
from megatron_tinyllama.checkpoint.hf import ConversionError
from megatron_tinyllama.checkpoint.sharded import RangeReader
from megatron_tinyllama.config import ModelConfig

FORMAT = 2
TRAINER_STATE = "trainer_state.json"


def tp_tag(tp_rank: int, tp_size: int) -> str:
    return f"tp{tp_rank:02d}-of-{tp_size:02d}"


def tensor_key(kind: str, tp_rank: int, tp_size: int, name: str) -> str:
    return f"{kind}/{tp_tag(tp_rank, tp_size)}/{name}"


def shapes_key(tp_rank: int, tp_size: int) -> str:
    return f"shapes/{tp_tag(tp_rank, tp_size)}"


def rng_key(rank: int) -> str:
    return f"rng/rank{rank:05d}"


def _payload(directory: Union[str, Path]) -> dict:
    try:
        payload = json.loads((Path(directory) / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def is_per_rank_checkpoint(directory: Union[str, Path]) -> bool:
    """Whether ``directory`` is a complete per-rank checkpoint (not DeepSpeed's + model/)."""
    return _payload(directory).get("checkpoint_format") == FORMAT


def model_config_of(payload: dict, directory: Union[str, Path]) -> ModelConfig:
    """The model config a per-rank checkpoint was trained with (its trainer_state.json).

    Raises:
        ConversionError: the config is missing or unreadable (named).
    """
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return ModelConfig(**{k: v for k, v in payload["config"]["model"].items() if k in fields})
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ConversionError(f"{Path(directory) / TRAINER_STATE}: no readable model config "
                              f"({type(err).__name__}: {err})") from None


def tensor_parallel_size_of(payload: dict, directory: Union[str, Path]) -> int:
    try:
        return int(payload["layout"]["tensor_parallel_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise ConversionError(f"{Path(directory) / TRAINER_STATE}: no layout.tensor_parallel_size "
                              f"({type(err).__name__}: {err})") from None


def read_shapes(reader: RangeReader, directory: Union[str, Path], tp_rank: int,
                tp_size: int) -> dict[str, tuple[int, ...]]:
    """{parameter: shape} of one TP rank, in the model's order."""
    key = shapes_key(tp_rank, tp_size)
    try:
        _, blobs = reader.read({}, blobs=(key,))
    except (KeyError, OSError) as err:
        raise ConversionError(f"{directory}: no tensor shapes for TP rank {tp_rank} ({err})") from None
    return {name: tuple(shape) for name, shape in json.loads(blobs[key]).items()}


def read_model_index(directory: Union[str, Path]) -> tuple[ModelConfig, int]:
    """The model config and TP degree of a model directory or a per-rank checkpoint."""
    payload = _payload(directory)
    if payload.get("checkpoint_format") == FORMAT and not (Path(directory) / native.MODEL_INDEX).is_file():
        return model_config_of(payload, directory), tensor_parallel_size_of(payload, directory)
    return native.read_model_index(directory)


def load_model_shard(directory: Union[str, Path], tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """One TP rank's fp32 weights from a model directory or a per-rank checkpoint.

    Raises:
        ConversionError: a file missing, truncated or unreadable (named).
    """
    payload = _payload(directory)
    if payload.get("checkpoint_format") != FORMAT or (Path(directory) / native.MODEL_INDEX).is_file():
        return native.load_model_shard(directory, tp_rank, tp_size)
    saved_tp = tensor_parallel_size_of(payload, directory)
    if saved_tp != tp_size:
        raise ConversionError(f"{directory}: written at TP={saved_tp}, not {tp_size}")
    reader = RangeReader(Path(directory))
    shapes = read_shapes(reader, directory, tp_rank, tp_size)
    keys = {tensor_key("fp32", tp_rank, tp_size, name): name for name in shapes}
    try:
        flat = reader.read({key: (0, int(torch.Size(shapes[name]).numel())) for key, name in keys.items()})
    except (KeyError, ValueError, OSError, RuntimeError) as err:
        raise ConversionError(f"{directory}: unreadable weights ({type(err).__name__}: {err})") from None
    return {name: flat[key].reshape(shapes[name]) for key, name in keys.items()}


def load_model_checkpoint(directory: Union[str, Path]) -> tuple[ModelConfig, list[dict[str, torch.Tensor]]]:
    """The model config and every TP rank's fp32 weights of a model directory or a per-rank
    checkpoint."""
    model_cfg, tp_size = read_model_index(directory)
    return model_cfg, [load_model_shard(directory, r, tp_size) for r in range(tp_size)]
