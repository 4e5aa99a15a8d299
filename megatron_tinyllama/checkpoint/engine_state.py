"""What a rank holds of the training state, as flat ranges: the save side of a checkpoint.

This module owns the translation from a live DeepSpeed engine to the ranges checkpoint.sharded
stores, one rank at a time and with no communication:

* ZeRO-3 (with or without node-local sharding): the rank's partition of every parameter's fp32
  master weights and AdamW moments, ``[rank * partition, ...)`` of the flattened tensor;
* ZeRO-1/2 and DeepSpeed's bf16 optimizer: the rank's fragment of each parameter (its ``hp``
  mapping), so a parameter split over two ranks' partitions is two ranges;
* no ZeRO partitioning: the whole tensor (every data-parallel rank offers it; DCP keeps one).

A tensor is named ``<kind>/tp<r>-of-<n>/<parameter>`` with kind ``fp32``, ``exp_avg`` or
``exp_avg_sq``: each TP rank's tensors are megatron-core's slices, merged on a TP change by
checkpoint.hf's rules (checkpoint.reshard). Shapes travel as one small blob per TP rank, RNG
states as one blob per rank.

Training goes on while a background save writes, so :func:`stage` copies the ranges to host
memory first: the rank's share of the checkpoint, nothing more.
"""

from __future__ import annotations

import io
import json
import random

import numpy as np
import torch

from megatron_tinyllama.checkpoint.per_rank import tensor_key
from megatron_tinyllama.checkpoint.sharded import Range
from megatron_tinyllama.checkpoint.weights import inner_optimizer, param_shape, zero3_partition_range

MOMENTS = ("exp_avg", "exp_avg_sq")
KINDS = ("fp32",) + MOMENTS


def _held(param, kind: str, optimizer) -> tuple[int, torch.Tensor] | None:
    """(first element, 1-D view) of what this rank holds of one parameter's ``kind``; None when
    it holds nothing of it."""
    numel = int(torch.Size(param_shape(param)).numel())
    if hasattr(param, "ds_id") and param.requires_grad:  # ZeRO-3 partition
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        first, count = zero3_partition_range(param)
        local = safe_get_local_fp32_param(param) if kind == "fp32" else safe_get_local_optimizer_state(param, kind)
        return first, local.reshape(-1)[:count]
    if hasattr(param, "_hp_mapping") and param.requires_grad:  # ZeRO-1/2, bf16 optimizer
        mapping = param._hp_mapping
        if mapping is None or mapping.lp_fragment_address.numel == 0:
            return None
        fragment = mapping.get_hp_fragment(None if kind == "fp32" else kind)
        return int(mapping.lp_fragment_address.start), fragment.reshape(-1)
    if hasattr(param, "ds_id"):
        raise NotImplementedError(f"a frozen parameter under ZeRO-3 is not saved: {param.ds_shape}")
    if kind == "fp32":
        return 0, param.data.reshape(-1)
    if not param.requires_grad:
        return None
    return 0, optimizer.state[param][kind].reshape(-1)[:numel]


def held_ranges(engine, adam_step: int) -> list[Range]:
    """Views of everything this rank holds of the fp32 weights and (once AdamW has stepped) the
    moments. No communication. Before the first step there are no moments: none are saved and a
    load leaves them zero."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    optimizer = inner_optimizer(engine)
    kinds = KINDS if adam_step else ("fp32",)
    ranges = []
    for name, param in engine.module.named_parameters():
        numel = int(torch.Size(param_shape(param)).numel())
        for kind in kinds:
            if kind != "fp32" and not param.requires_grad:
                continue
            held = _held(param, kind, optimizer)
            if held is not None and held[1].numel():
                ranges.append(Range(tensor_key(kind, tp_rank, tp_size, name), numel, held[0], held[1].detach()))
    return ranges


def stage(ranges: list[Range], buffer: torch.Tensor | None = None) -> tuple[list[Range], torch.Tensor]:
    """Copies of ``ranges`` in one flat host buffer (pinned when an accelerator is used, so the
    copies overlap), and that buffer: what a background save holds while it writes.

    ``buffer`` (the one returned by the save before, same size) is reused: the rank's share is
    allocated once per run, and a save then costs a copy into memory already mapped (here 6 GB/s
    against 2.4 for fresh pages)."""
    total = sum(item.values.numel() for item in ranges)
    cuda = torch.cuda.is_available()
    if buffer is None or buffer.numel() != total:
        buffer = torch.empty(total, dtype=torch.float32, pin_memory=cuda)
    staged, offset = [], 0
    for item in ranges:
        count = item.values.numel()
        copy = buffer[offset:offset + count]
        copy.copy_(item.values.detach().reshape(-1), non_blocking=item.values.is_cuda)
        staged.append(Range(item.key, item.numel, item.first, copy))
        offset += count
    if cuda:
        torch.cuda.synchronize()
    return staged, buffer


def shapes_blob(engine) -> bytes:
    return json.dumps({name: list(param_shape(p)) for name, p in engine.module.named_parameters()}).encode()


def rng_blob() -> bytes:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def set_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
