"""The DeepSpeed config dict: a base JSON from ds_configs/ plus what the recipe decides.

Batch geometry, precision, gradient clipping and the ZeRO stage are set once in the recipe and
copied here, so the JSON files carry only ZeRO tuning. The layout a job runs (data-parallel size,
TP degree, ZeRO stage, node-local sharding) is decided here once, by :func:`planned_layout`, for
the DeepSpeed config and for the start plan's comparison with a checkpoint; there
``parallel.zero_stage: auto`` becomes the fastest stage predicted to fit the device
(:func:`choose_auto_stage`, by parallel/memory_model.py and parallel/comm_model.py). The global
batch is given in tokens and split as ``micro_batch_size x accumulation x data_parallel x
seq_length``; a batch that does not split is an error naming the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_tinyllama.config import ConfigError, JobConfig
from megatron_tinyllama.resources import resource_dir

logger = logging.getLogger(__name__)

REPO_DS_CONFIGS = resource_dir("ds_configs")


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


def auto_zero_stage(stage, data_parallel_size: int) -> int:
    """``parallel.zero_stage`` as the rule before the memory model (issue 29) resolved it: 'auto' was
    1 at one data-parallel rank, else 3. Only for checkpoints saved without a ``layout`` record
    (checkpoint/compat.py), which ran by that rule; a run resolves 'auto' by :func:`resolve_zero_stage`."""
    if stage == "auto":
        return 1 if data_parallel_size == 1 else 3
    return int(stage)


@dataclass(frozen=True)
class AutoStage:
    """What ``parallel.zero_stage: auto`` resolves to, and the one line that says why."""

    stage: int
    hpz_ranks: int
    reason: str
    fits: bool = True
    """False when no stage is predicted to fit (then the one needing least memory)."""


def choose_auto_stage(cfg: JobConfig, world_size: int, local_world_size: int, device=None, *,
                      inter_node_gbytes_per_s: Optional[float] = None) -> AutoStage:
    """The ZeRO stage 'auto' gives this recipe on ``world_size`` ranks, ``local_world_size`` per node.

    * One data-parallel rank: ZeRO-1 (nothing to shard; ZeRO-1 under bf16 is DeepSpeed's
      BF16_Optimizer: fp32 masters and fp32 accumulation without ZeRO-3's parameter hooks).
    * Otherwise, of ZeRO-1, -2 and -3 (with the recipe's node-local sharding, where in effect: a
      ZeRO-3 setting), the one with the shortest predicted step (parallel/layout_plan.py: compute
      at each stage's measured efficiency + the communication model's bytes over the links) among
      those whose predicted memory (parallel/memory_model.py), 10% added, fits the device; on a
      tie the lower stage. ZeRO-1 sends ~5x fewer bytes than ZeRO-3 at v1's 8 accumulation steps
      (it reduces gradients once per step, ZeRO-3 after every micro-batch) and computes without
      hooks. When none fits, the one that needs least memory, with a warning.

    Args:
        device: a :class:`~megatron_tinyllama.parallel.memory_model.Device`; default: this
            machine's (its GPU's memory; on the CPU the host's memory divided among its ranks).
        inter_node_gbytes_per_s: link between nodes (default: layout_plan's, one HDR NIC).
    """
    tp = cfg.parallel.tensor_parallel_size
    dp = world_size // tp
    if dp == 1:
        return AutoStage(1, 1, "ZeRO-1: one data-parallel rank, nothing to shard")
    hpz = node_local_block_size(cfg, dp, local_world_size) > 1
    from megatron_tinyllama.parallel.layout_plan import layout_option
    from megatron_tinyllama.parallel.memory_model import GIB, this_device

    device = device or this_device(local_world_size)
    options = [layout_option(cfg, world_size, local_world_size, device, stage, hpz=hpz and stage == 3,
                             inter_node_gbytes_per_s=inter_node_gbytes_per_s) for stage in (1, 2, 3)]
    fitting = [o for o in options if o.fits]
    best = (min(fitting, key=lambda o: (o.step_seconds, o.stage)) if fitting
            else min(options, key=lambda o: (o.memory.total, o.stage)))
    others = []
    for o in options:
        if o is best:
            continue
        note = f"ZeRO-{o.stage} would move {o.wire_gbytes:.1f} ({o.tokens_per_s_per_gpu:,.0f} tokens/s per GPU"
        note += ")" if o.fits else f", {o.memory.total / GIB:.1f} GiB: does not fit)"
        others.append(note)
    reason = f"{best.summary()}, {best.tokens_per_s_per_gpu:,.0f} tokens/s per GPU predicted; " + ", ".join(others)
    if not fitting:
        reason = f"no stage is predicted to fit {device.name}; the smallest: {reason}"
    return AutoStage(best.stage, best.hpz_ranks, reason, bool(fitting))


_LOGGED: set[str] = set()


def _log_once(line: str, level: int = logging.INFO) -> None:
    """Log ``line`` the first time only: the start plan and the DeepSpeed config both plan the layout."""
    if line not in _LOGGED:
        _LOGGED.add(line)
        logger.log(level, line)


def resolve_zero_stage(cfg: JobConfig, data_parallel_size: int, local_world_size: Optional[int] = None,
                       device=None) -> int:
    """The ZeRO stage this job runs: ``parallel.zero_stage``, with 'auto' resolved by
    :func:`choose_auto_stage` (logged once per process: ``zero_stage auto -> ZeRO-1: ...``).

    Args:
        local_world_size: ranks per node (default: all on one node).
        device: see :func:`choose_auto_stage`.

    Raises:
        ConfigError: stage 0 with bf16 (DeepSpeed would train bf16 weights without fp32 masters).
    """
    stage = cfg.parallel.zero_stage
    if stage == "auto":
        world = data_parallel_size * cfg.parallel.tensor_parallel_size
        choice = choose_auto_stage(cfg, world, local_world_size or world, device)
        line = f"zero_stage auto -> {choice.reason}"
        if choice.fits:
            _log_once(line)
        else:
            _log_once(f"{line}; lower train.micro_batch_size, set model.activation_checkpointing or use more "
                      "GPUs", logging.WARNING)
        stage = choice.stage
    if stage == 0 and cfg.train.precision == "bf16":
        raise ConfigError("parallel.zero_stage=0 with train.precision=bf16: DeepSpeed's stage 0 keeps no "
                          "fp32 master weights in bf16; use zero_stage 1 (the same memory on one GPU)")
    return int(stage)


def node_local_block_size(cfg: JobConfig, data_parallel_size: int, local_world_size: int) -> int:
    """Ranks per node-local sharding block (1 = off), with the reason logged when it is off.

    ``parallel.hpz_partition_size`` counts GPUs (0: the launcher's local world size, i.e. one
    node). Each block holds ``block / TP`` ranks of every data-parallel group; sharding a secondary
    parameter copy over them only pays when a block is more than one of those ranks and less
    than the whole data-parallel group.

    Raises:
        ConfigError: the block is not a multiple of the TP degree, or the ZeRO stage is not 3.
    """
    par = cfg.parallel
    block = par.hpz_partition_size or local_world_size
    if block <= 1:
        return 1
    if par.zero_stage not in (3, "auto"):
        raise ConfigError("parallel.hpz_partition_size > 1 needs parallel.zero_stage=3 (or 'auto')")
    tp = par.tensor_parallel_size
    if block % tp:
        raise ConfigError(f"parallel.hpz_partition_size={block} must be a multiple of "
                          f"parallel.tensor_parallel_size={tp} (a node holds whole TP groups)")
    members = block // tp
    if data_parallel_size % members:
        raise ConfigError(f"parallel.hpz_partition_size={block} gives node-local groups of {members} "
                          f"data-parallel ranks, which do not divide the data-parallel size "
                          f"{data_parallel_size}")
    if members >= data_parallel_size:
        logger.info("node-local sharding off: one node holds the whole data-parallel group, where it "
                    "is plain ZeRO-3 plus a second parameter copy (pure overhead)")
        return 1
    if members == 1:
        logger.info("node-local sharding off: a node holds one rank of each data-parallel group "
                    "(hpz_partition_size=%d, TP=%d), nothing to shard within it", block, tp)
        return 1
    return block


@dataclass(frozen=True)
class Layout:
    """How a job's ranks hold the training state: what DeepSpeed's shards and a checkpoint's
    ranges depend on. Decided once, by :func:`planned_layout`, for the DeepSpeed config, the
    start plan's comparison with a checkpoint, and the check of the built engine."""

    data_parallel_size: int
    tensor_parallel_size: int
    zero_stage: int
    node_local_ranks: int
    """Data-parallel ranks per node-local sharding group (DeepSpeed's ``zero_hpz_partition_size``);
    1 = off."""

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def planned_layout(cfg: JobConfig, world_size: int, local_world_size: int, device=None) -> Layout:
    """The layout this recipe runs on ``world_size`` ranks, ``local_world_size`` per node.

    Args:
        device: what 'auto' fits the layout to (:func:`choose_auto_stage`); default: this machine's.

    Raises:
        ConfigError: a ZeRO stage or node-local sharding that cannot run here (named).
    """
    tp = cfg.parallel.tensor_parallel_size
    dp = world_size // tp
    block = node_local_block_size(cfg, dp, local_world_size)
    stage = resolve_zero_stage(cfg, dp, local_world_size, device)
    if block > 1 and stage != 3:  # only 'auto' gets here: an explicit stage below 3 was refused
        _log_once(f"node-local sharding off: zero_stage auto picked ZeRO-{stage}, and "
                  f"parallel.hpz_partition_size is a ZeRO-3 setting")
        block = 1
    return Layout(dp, tp, stage, block // tp if block > 1 else 1)


def build_ds_config(cfg: JobConfig, data_parallel_size: int, local_world_size: int,
                    global_batch_tokens: Optional[int] = None) -> dict:
    """The full DeepSpeed config for this job and world.

    Mixed precision is done as the best stacks do it: bf16 (or fp16) parameters and activations,
    fp32 master weights (DeepSpeed's optimizer partitions), and gradients accumulated over
    micro-batches and reduced across data-parallel ranks in fp32 (``data_types.grad_accum_dtype``
    and ``communication_data_type``): the v1 recipe accumulates 16 micro-batches per step.

    DeepSpeed's throughput timer is always off (``timers.throughput``): it would synchronise the
    device twice per micro-batch, and the training loop measures throughput itself.

    Raises:
        ConfigError: for batch geometry or node-local sharding that does not fit the world.
    """
    par = cfg.parallel
    layout = planned_layout(cfg, data_parallel_size * par.tensor_parallel_size, local_world_size)
    default_json = "zero3_node_local.json" if layout.node_local_ranks > 1 else "zero3.json"
    ds = load_base_ds_config(par.ds_config, default_json)
    geometry = batch_geometry(cfg, data_parallel_size, global_batch_tokens)
    ds["train_batch_size"] = geometry.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = geometry.micro_batch_size
    ds["gradient_accumulation_steps"] = geometry.gradient_accumulation_steps
    ds["gradient_clipping"] = cfg.optimizer.grad_clip
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16"}
    ds["fp16"] = {"enabled": cfg.train.precision == "fp16", "initial_scale_power": 16}
    stage = layout.zero_stage
    if cfg.train.precision != "fp32" and stage > 0:
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
    # No dataloader is handed to DeepSpeed, so engine.forward and engine.step start and stop its
    # throughput timer on every micro-batch, and with ``synchronized`` (its default) each call
    # synchronises the device: two stalls per micro-batch. train/metrics.py measures tokens/s.
    throughput = ds.setdefault("timers", {}).setdefault("throughput", {})
    throughput.update(enabled=False, synchronized=False)
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = stage
    if layout.node_local_ranks > 1:
        # DeepSpeed's value counts data-parallel ranks per group; the group itself is built by
        # parallel.init.initialize_node_local_group, TP-aware.
        zero["zero_hpz_partition_size"] = layout.node_local_ranks
    else:
        zero.pop("zero_hpz_partition_size", None)
    return ds
