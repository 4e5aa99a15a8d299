"""Model weights in and out of a live DeepSpeed engine.

This module owns the places where full tensors meet the engine's shards:

* :func:`load_weights_into_engine` (``checkpoint.init_from``): every rank reads its own
  tensor-parallel shard of a model directory (resharded when it was written at another TP degree)
  and puts it into the parameters **and** into the optimizer's fp32 master copy. The master copy
  matters: ZeRO builds it from the parameters at ``deepspeed.initialize`` and copies it back into
  the parameters after every step, so weights written only into the parameters are lost at the
  first step. Writing it from the fp32 source also keeps bf16 runs' master weights exact.
* the ranges of a parameter a rank holds under each ZeRO stage (:func:`zero3_partition_range`,
  :func:`zero12_fragment_range`) and their setters, for the checkpoint's save
  (checkpoint.engine_state) and load (checkpoint.reshard);
* :func:`check_tp_replicas`: parameters that every TP rank holds whole (norm gains) must stay
  identical across the TP group; a drift would silently fork the model.
* :func:`set_optimizer_state`: one parameter's AdamW moments from this TP rank's full tensor,
  whatever ZeRO stage partitions them (for checkpoint.reshard).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tinyllama.checkpoint.hf import ConversionError, merge_tp_shards, repad_vocab, shard_for_tp
# Model directories and per-rank checkpoints alike (checkpoint.per_rank).
from megatron_tinyllama.checkpoint.per_rank import load_model_checkpoint, load_model_shard, read_model_index
from megatron_tinyllama.config import ModelConfig

logger = logging.getLogger(__name__)


class ReplicaDriftError(RuntimeError):
    """Tensor-parallel ranks hold different values of a parameter they should share."""


def read_shard_for_rank(directory: Path, model_cfg: ModelConfig, tp_rank: int,
                        tp_size: int) -> dict[str, torch.Tensor]:
    """This TP rank's tensors from a model directory written at any TP degree.

    A directory written at ``tp_size`` is read shard by shard (each rank reads one file); another
    degree is merged and re-split, with the vocabulary padding redone for ``tp_size``.
    """
    from megatron_tinyllama.model.build import padded_vocab_size

    _, saved_tp = read_model_index(directory)
    if saved_tp == tp_size:
        return load_model_shard(directory, tp_rank, tp_size)
    _, shards = load_model_checkpoint(directory)
    full = repad_vocab(merge_tp_shards(shards), model_cfg, padded_vocab_size(model_cfg.vocab_size, tp_size))
    logger.info("resharding %s from TP=%d to TP=%d", directory, saved_tp, tp_size)
    return shard_for_tp(full, tp_size)[tp_rank]


def param_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    # Under ZeRO-3 a parameter's own tensor is an empty placeholder; ds_shape is the real shape.
    return tuple(getattr(param, "ds_shape", param.shape))


def _set_master_weight(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write ``value`` (this TP rank's full fp32 tensor) into the optimizer's master copy."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition of the flattened, padded tensor
        safe_set_local_fp32_param(param, _zero3_local_part(param, value))
    elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2 and DeepSpeed's bf16 optimizer
        safe_set_full_fp32_param(param, value.to(param.device))
    # Otherwise the parameter is its own master copy and already holds the value.


def load_weights_into_engine(engine, state: dict[str, torch.Tensor], source: str) -> None:
    """Put this TP rank's full tensors into the engine's parameters and fp32 master weights.

    Collective over all ranks (ZeRO-3 gathers each parameter once). Every data-parallel rank of a
    TP rank reads the same shard, so the broadcast from DP rank 0 that ZeRO-3 does on release
    changes nothing; what matters is that each TP rank loads its own shard.

    Raises:
        ConversionError: a tensor missing, unexpected or of another shape (named, with ``source``).
    """
    params = dict(engine.module.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(k for k in set(state) - set(params) if not k.endswith("_extra_state"))
    if missing or unexpected:
        raise ConversionError(f"{source}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for name, param in params.items():
        if tuple(state[name].shape) != param_shape(param):
            raise ConversionError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                                  f"the model expects {param_shape(param)}")
    for name, param in params.items():
        set_weight(param, state[name])


def set_weight(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Put this TP rank's full tensor into one parameter and its fp32 master copy (collective
    over the data-parallel group under ZeRO-3)."""
    import deepspeed

    value = value.to(torch.float32)
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=hasattr(param, "ds_id")):
        param.data.copy_(value.to(device=param.device, dtype=param.dtype))
    _set_master_weight(param, value)


def _zero3_local_part(param: torch.nn.Parameter, value: torch.Tensor) -> torch.Tensor:
    """This rank's partition of a ZeRO-3 parameter's flattened tensor, padded as ZeRO pads it
    (DeepSpeed's set_full_hp_param narrows the unpadded tensor, which fails on the last rank)."""
    group = param.ds_process_group
    rank, count = dist.get_rank(group=group), dist.get_world_size(group=group)
    size = param.ds_tensor.ds_numel
    flat = torch.zeros(size * count, dtype=torch.float32)
    flat[: value.numel()] = value.reshape(-1)
    return flat[rank * size:(rank + 1) * size].to(param.ds_tensor.device)


def set_optimizer_state(param: torch.nn.Parameter, key: str, value: torch.Tensor, optimizer) -> None:
    """Write this TP rank's full tensor into the optimizer state ``key`` of a parameter (each
    rank keeps its ZeRO partition). The state must exist (see reshard.prepare_adam_state)."""
    from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

    value = value.to(torch.float32)
    if hasattr(param, "ds_id"):
        safe_set_local_optimizer_state(param, _zero3_local_part(param, value), key)
    elif hasattr(param, "_hp_mapping"):
        safe_set_full_optimizer_state(param, value.to(param.device), key)
    else:
        optimizer.state[param][key].copy_(value.reshape(param.shape).to(param.device))


def _is_tp_replicated(param: torch.nn.Parameter) -> bool:
    # megatron-core marks tensor-parallel shards; everything else is held whole by every TP rank.
    return not getattr(param, "tensor_model_parallel", False)


def zero3_partition_range(param: torch.nn.Parameter) -> tuple[int, int]:
    """(first element, element count) of this rank's ZeRO-3 partition of a parameter's flattened
    tensor, ZeRO's padding left out (the last ranks' partitions may hold fewer or none)."""
    rank = dist.get_rank(group=param.ds_process_group)  # the group ZeRO-3 partitions over
    size = param.ds_tensor.ds_numel
    first = rank * size
    return first, max(0, min(size, int(torch.Size(param_shape(param)).numel()) - first))


def zero3_reads_own_partition(param: torch.nn.Parameter) -> bool:
    """Whether a load can fill this parameter from its own partition alone: a trained ZeRO-3
    parameter that is not persistent (a persistent one, small, is also held whole on every rank)."""
    return hasattr(param, "ds_id") and param.requires_grad and not getattr(param, "ds_persist", False)


def set_zero3_partition(param: torch.nn.Parameter, key: Optional[str], values: torch.Tensor) -> None:
    """Write this rank's ZeRO-3 partition (``values``: the unpadded elements from its first, as
    :func:`zero3_partition_range` gives) of the fp32 master weights and the bf16 parameter (``key``
    None), or of AdamW state ``key``. No communication; with node-local sharding the caller then
    drops the secondary copies (DeepSpeed's ``invalidate_secondary_tensor``)."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    count = values.numel()
    if count == param.ds_tensor.ds_numel and values.dtype == torch.float32:  # no padding: as read
        padded = values.reshape(-1)
    else:  # zeros only where ZeRO pads (filling the whole partition first cost a second pass)
        padded = torch.empty(param.ds_tensor.ds_numel, dtype=torch.float32)
        padded[:count] = values.reshape(-1)
        padded[count:] = 0
    padded = padded.to(param.ds_tensor.device)
    if key is None:
        safe_set_local_fp32_param(param, padded)
        param.ds_tensor.data.copy_(padded.to(param.ds_tensor.dtype))  # the bf16 partition forward gathers
    else:
        safe_set_local_optimizer_state(param, padded, key)


def zero12_fragment_range(param: torch.nn.Parameter) -> Optional[tuple[int, int]]:
    """(first element, element count) of this rank's fragment of a parameter's flattened fp32
    master weights and optimizer state under ZeRO-1/2 or DeepSpeed's bf16 optimizer (its ``hp``
    mapping); (0, 0) where this rank holds none of it; None for a parameter not laid out so."""
    if not hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
        return None
    mapping = param._hp_mapping
    if mapping is None:
        return 0, 0
    return int(mapping.lp_fragment_address.start), int(mapping.lp_fragment_address.numel)


def set_zero12_fragment(param: torch.nn.Parameter, key: str, values: torch.Tensor) -> None:
    """Write AdamW state ``key`` of this rank's ZeRO-1/2 fragment (``values``: the elements
    :func:`zero12_fragment_range` names). No communication."""
    if param._hp_mapping is not None and values.numel():
        fragment = param._hp_mapping.get_hp_fragment(key)
        fragment.data.copy_(values.to(device=fragment.device, dtype=torch.float32))


def inner_optimizer(engine):
    # DeepSpeed's ZeRO optimizers wrap torch's AdamW (over flat fp32 partitions) as .optimizer.
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def check_tp_replicas(engine, state: dict[str, torch.Tensor], tolerance: float) -> float:
    """Compare TP-replicated parameters (norm gains) with TP rank 0's copy; collective.

    ``state`` holds at least this rank's replicated parameters (:func:`write_master_weights`).

    Returns:
        The largest absolute difference found (0.0 when the TP degree is 1).

    Raises:
        ReplicaDriftError: a difference above ``tolerance``, naming the parameter, on every rank.
    """
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return 0.0
    group = parallel_state.get_tensor_model_parallel_group()
    src = dist.get_global_rank(group, 0)
    worst, worst_name = 0.0, ""
    for name, param in engine.module.named_parameters():
        if not _is_tp_replicated(param):
            continue
        reference = state[name].clone()
        _broadcast_cpu(reference, src, group)
        diff = (state[name] - reference).abs().max().item()
        if diff > worst:
            worst, worst_name = diff, name
    found = torch.tensor([worst], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    worst_anywhere = found.item()
    if worst_anywhere > tolerance:
        where = f" (largest on this rank: {worst_name})" if worst_name else ""
        raise ReplicaDriftError(
            f"tensor-parallel replicas drifted: a replicated parameter differs from TP rank 0's copy "
            f"by {worst_anywhere:.3e} > checkpoint.tp_replica_tolerance={tolerance}{where}; the "
            "checkpoint was not marked complete. Resume from the previous checkpoint and report this"
        )
    return worst_anywhere


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _broadcast_cpu(tensor: torch.Tensor, src: int, group) -> None:
    """Broadcast a CPU tensor in place over ``group`` (through the accelerator under NCCL)."""
    device = _comm_device()
    moved = tensor.to(device)
    dist.broadcast(moved, src=src, group=group)
    tensor.copy_(moved.cpu())
