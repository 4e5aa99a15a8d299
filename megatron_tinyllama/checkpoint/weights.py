"""Model weights in and out of a live DeepSpeed engine.

This module owns the places where full tensors meet the engine's shards:

* :func:`load_weights_into_engine` (``checkpoint.init_from``): every rank reads its own
  tensor-parallel shard of a model directory (resharded when it was written at another TP degree)
  and puts it into the parameters **and** into the optimizer's fp32 master copy. The master copy
  matters: ZeRO builds it from the parameters at ``deepspeed.initialize`` and copies it back into
  the parameters after every step, so weights written only into the parameters are lost at the
  first step. Writing it from the fp32 source also keeps bf16 runs' master weights exact.
* :func:`gather_full_weights`: this TP rank's full fp32 weights (the master copy, not the bf16
  parameters) for the model export written beside each training checkpoint.
* :func:`check_tp_replicas`: parameters that every TP rank holds whole (norm gains) must stay
  identical across the TP group; a drift would silently fork the model.
* :func:`get_optimizer_state` / :func:`set_optimizer_state`: one parameter's AdamW moments as
  this TP rank's full tensor, whatever ZeRO stage partitions them (for checkpoint.reshard).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Collection, Union

import torch
import torch.distributed as dist

from megatron_tinyllama.checkpoint.hf import ConversionError, merge_tp_shards, repad_vocab, shard_for_tp
from megatron_tinyllama.checkpoint.native import load_model_checkpoint, load_model_shard, read_model_index
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


def get_optimizer_state(param: torch.nn.Parameter, key: str, optimizer) -> torch.Tensor:
    """This TP rank's full fp32 optimizer state ``key`` (``exp_avg``...) of a parameter, in its
    shape. Collective over the data-parallel group under ZeRO (every rank gets the tensor)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        value = safe_get_full_optimizer_state(param, key)
    else:  # no ZeRO partitioning: the parameter is its own master and owns its state
        value = optimizer.state[param][key]
    return value.detach().float().cpu().reshape(param_shape(param)).clone()


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


def gather_full_weights(engine, keep_all: Union[bool, Collection[str]]) -> dict[str, torch.Tensor]:
    """This TP rank's full fp32 weights, from the optimizer's master copy where there is one.

    Collective over the data-parallel group (each parameter is all-gathered on every rank).
    Returns (on CPU) every tensor when ``keep_all`` is True, the named ones when it is a
    collection of names (the share this rank writes), and always the TP-replicated ones (small,
    for :func:`check_tp_replicas`), so no rank holds more than it writes.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        keep = (keep_all is True or (not isinstance(keep_all, bool) and name in keep_all)
                or _is_tp_replicated(param))
        master = safe_get_full_fp32_param(param) if param.requires_grad else None
        if master is None:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None,
                                                   enabled=hasattr(param, "ds_id")):
                master = param.data.detach().float().clone() if keep else None
        if keep:
            state[name] = master.detach().float().cpu().reshape(param_shape(param)).clone()
    return state


def check_tp_replicas(engine, state: dict[str, torch.Tensor], tolerance: float) -> float:
    """Compare TP-replicated parameters (norm gains) with TP rank 0's copy; collective.

    ``state`` holds at least this rank's replicated parameters (:func:`gather_full_weights`).

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
