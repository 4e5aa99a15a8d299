"""The DeepSpeed config dict: a base JSON from ds_configs/ plus what the recipe decides.

Batch geometry, precision, gradient clipping and the ZeRO stage are set once in the recipe and
copied here, so the JSON files carry only ZeRO tuning. The global batch is given in tokens and
split as ``micro_batch_size x accumulation x data_parallel x seq_length``; a batch that does not
split is an error naming the numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_tinyllama.config import ConfigError, JobConfig

REPO_DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


@dataclass(frozen=True)
class BatchGeometry:
    """How one optimizer step's sequences are spread over ranks and micro-batches."""

    global_batch_size: int
    micro_batch_size: int
    data_parallel_size: int
    gradient_accumulation_steps: int


def batch_geometry(cfg: JobConfig, data_parallel_size: int,
                   global_batch_tokens: Optional[int] = None) -> BatchGeometry:
    """Split the global batch (tokens) into micro-batches per DP rank.

    Raises:
        ConfigError: the batch does not divide into whole micro-batches on every DP rank.
    """
    tokens = global_batch_tokens or cfg.train.global_batch_tokens
    seq, micro = cfg.model.seq_length, cfg.train.micro_batch_size
    if tokens % seq:
        raise ConfigError(f"train.global_batch_tokens={tokens} is not a multiple of model.seq_length={seq}")
    sequences = tokens // seq
    per_step = micro * data_parallel_size
    if sequences % per_step:
        raise ConfigError(
            f"train.global_batch_tokens={tokens} = {sequences} sequences of {seq} tokens does not split "
            f"into train.micro_batch_size={micro} x {data_parallel_size} data-parallel ranks x whole "
            f"accumulation steps; use a multiple of {per_step * seq} tokens"
        )
    return BatchGeometry(sequences, micro, data_parallel_size, sequences // per_step)


def _strip_comments(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_comments(v) for k, v in node.items() if not k.startswith("_")}
    return node


def load_base_ds_config(name_or_path: Optional[str], default: str) -> dict:
    """Read a DeepSpeed JSON by path, or by file name from the repository's ds_configs/."""
    candidate = Path(name_or_path or default)
    if not candidate.is_file():
        candidate = REPO_DS_CONFIGS / candidate.name
    if not candidate.is_file():
        raise ConfigError(f"parallel.ds_config: {name_or_path or default} not found (looked in {REPO_DS_CONFIGS})")
    try:
        return _strip_comments(json.loads(candidate.read_text()))
    except ValueError as err:
        raise ConfigError(f"{candidate}: not valid JSON ({err})") from None


def build_ds_config(cfg: JobConfig, data_parallel_size: int, local_world_size: int,
                    global_batch_tokens: Optional[int] = None) -> dict:
    """The full DeepSpeed config for this job and world.

    Raises:
        ConfigError: for batch geometry, or hpZ combined with tensor parallelism (DeepSpeed builds
            hpZ groups from consecutive global ranks, which mixes TP ranks when TP > 1).
    """
    par = cfg.parallel
    hpz = par.hpz_partition_size or local_world_size
    default_json = "zero3_node_local.json" if hpz > 1 else "zero3.json"
    ds = load_base_ds_config(par.ds_config, default_json)
    geometry = batch_geometry(cfg, data_parallel_size, global_batch_tokens)
    ds["train_batch_size"] = geometry.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = geometry.micro_batch_size
    ds["gradient_accumulation_steps"] = geometry.gradient_accumulation_steps
    ds["gradient_clipping"] = cfg.optimizer.grad_clip
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16"}
    ds["fp16"] = {"enabled": cfg.train.precision == "fp16", "initial_scale_power": 16}
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = par.zero_stage
    if hpz > 1:
        if par.zero_stage != 3:
            raise ConfigError("parallel.hpz_partition_size > 1 needs parallel.zero_stage=3")
        if par.tensor_parallel_size > 1:
            raise ConfigError(
                f"parallel.hpz_partition_size={hpz} with parallel.tensor_parallel_size="
                f"{par.tensor_parallel_size} is refused: DeepSpeed forms hpZ groups from consecutive "
                "global ranks, which would mix tensor-parallel ranks holding different shards. Use "
                "TP=1 with node-local sharding, or TP>1 with hpz_partition_size=1"
            )
        total = data_parallel_size * par.tensor_parallel_size
        if data_parallel_size % hpz or total % hpz:
            raise ConfigError(
                f"parallel.hpz_partition_size={hpz} must divide the data-parallel size {data_parallel_size}"
            )
        zero["zero_hpz_partition_size"] = hpz
    else:
        zero.pop("zero_hpz_partition_size", None)
    return ds
