"""Memory per GPU of a training layout, predicted before the job starts.

This module owns the arithmetic of what one rank holds while it trains: the model states of each
ZeRO stage (0-3), with node-local sharding (ZeRO++ hpZ) and tensor parallelism; the activations of
one micro-batch, with and without activation recompute; the loss's peak (the logits); and the
allocator's reserve. It counts the tensors DeepSpeed 0.19.8 allocates with the DeepSpeed config
this stack builds (:mod:`megatron_tinyllama.engine.ds_config`: bf16 parameters, fp32 master
weights, fp32 gradient accumulation and fp32 gradient reduction), and names the devices a
layout is fitted to. :mod:`megatron_tinyllama.parallel.layout_plan` puts it beside the
communication model to say which layouts fit and which is fastest.

Where it differs from DeepSpeed's own estimators, and why (both assume fp16/bf16 parameters with
fp16/bf16 gradients and fp32 Adam, and count model states only):

* ZeRO-1: DeepSpeed has no stage-1 estimator; its stage-2 one
  (``stage_1_and_2.estimate_zero2_model_states_mem_needs``: 2P + 18P/N) would shard the
  gradients. Under bf16 this stack's ZeRO-1 is DeepSpeed's ``BF16_Optimizer``, which keeps the
  bf16 gradients (2P) and an fp32 accumulation buffer of the whole model (4P) on every rank:
  8P + 12P/N, more than 2P + 18P/N at any N >= 2.
* ZeRO-2: 2P + 12P/N between steps (the fp32 gradient partition is freed at each step), plus
  the fp32 gradient partition (4P/N) and the reduction buckets during the step; DeepSpeed's
  2 + 18/N counts 16-bit gradients this config never keeps.
* ZeRO-3 (``stage3.estimate_zero3_model_states_mem_needs``: 4 x largest layer + 18P/N): the same
  18P/N (2P/N bf16 shard, 4P/N fp32 gradient partition, 12P/N fp32 masters and moments), plus what
  its estimator leaves out: the fp32 reduction bucket (``reduce_bucket_size`` x 4 bytes, 200 MB
  with the shipped config, allocated once), the parameters gathered ahead by the prefetcher (up
  to ``stage3_prefetch_bucket_size``), the persistent small parameters kept whole, and hpZ's
  secondary bf16 copy (2P/k for k ranks per node-local group). DeepSpeed's 4 x largest layer
  (the gathered layer and its gradient, 16-bit) is kept.
* On the CPU (gloo, tests) memory that is allocated but never written is not resident: a bucket
  counts only up to the gradients that fill it.

Activations follow Korthikanti et al. (2022, "Reducing Activation Recomputation"), for this
model's modules: no dropout, SwiGLU, grouped-query attention through SDPA / flash-attn (no
attention-score matrix kept), no sequence parallelism (layer inputs and norms are replicated on
TP ranks). Checked against measurement: the CPU resident memory of ZeRO-1/2/3 at 2 ranks
(tests/distributed/test_memory_model.py) and one H200 peak (docs/performance.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, Optional

from megatron_tinyllama.config import ModelConfig

GIB = float(1 << 30)

CHUNK_LOGIT_ELEMENTS = 1 << 25
"""Logit elements per chunk of the chunked loss (model/loss.py ``CHUNK_ELEMENTS``)."""

CUDA_CONTEXT_BYTES = 1.0 * GIB
"""What a CUDA process holds outside PyTorch's allocator: context, cuBLAS workspaces, NCCL buffers
(~0.5 GiB of context on an H100 plus NCCL's channels); an assumption until a GPU session
measures it (``torch.cuda.mem_get_info`` against ``memory_reserved``)."""

ALLOCATOR_SLACK = 0.05
"""Fraction of the peak allocated that PyTorch's caching allocator holds beyond it
(fragmentation between block sizes); an assumption until a GPU session measures reserved
against allocated."""

FIT_MARGIN = 0.10
"""A layout fits when its prediction plus this fraction of itself fits the device: the accuracy
the model is held to (issue 29: GPU peaks within 10%)."""


@dataclass(frozen=True)
class Device:
    """One accelerator (or one CPU rank's share of its host) as far as a layout's fit and speed go."""

    name: str
    memory_gib: float
    """What a process can allocate (``torch.cuda.get_device_properties().total_memory``)."""
    peak_tflops: float
    """Dense bf16 peak."""
    intra_node_gbytes_per_s: float
    """Collective bus bandwidth inside a node (nccl-tests busbw)."""
    kind: Literal["cuda", "cpu"] = "cuda"


DEVICES = {
    # total_memory as torch reports it (a little under the nominal size); NVLink busbw of an
    # 8-GPU node from nccl-tests all-reduce at large sizes (A100 NVLink3 ~230, H100/H200 NVLink4 ~360).
    "A100-40G": Device("A100-40G", 39.4, 312.0, 230.0),
    "H100-80G": Device("H100-80G", 79.1, 989.0, 360.0),
    "H200-141G": Device("H200-141G", 139.8, 989.0, 360.0),
}

CPU_PEAK_TFLOPS = 0.1
"""A CPU rank's compute, for ordering layouts only: 2 cores train tinyllama-small at ~4k tokens/s
(docs/performance.md), ~0.1 TFLOP/s."""
CPU_GLOO_GBYTES_PER_S = 2.0
"""gloo over loopback, for ordering layouts only."""


def device_by_name(spec: str) -> Device:
    """A known device name (``A100-40G``, ``H100-80G``, ``H200-141G``) or a memory size in GiB.

    Raises:
        ValueError: neither a known name nor a positive number (the known names listed).
    """
    if spec in DEVICES:
        return DEVICES[spec]
    try:
        gib = float(spec.upper().removesuffix("GB").removesuffix("G"))
    except ValueError:
        gib = -1.0
    if gib <= 0:
        raise ValueError(f"--device {spec!r}: expected one of {sorted(DEVICES)} or a memory size in GB")
    # A bare size: an A100's compute and links (the paper's device), that much memory.
    return Device(f"{gib:g} GB", gib, DEVICES["A100-40G"].peak_tflops, DEVICES["A100-40G"].intra_node_gbytes_per_s)


def this_device(local_world_size: int) -> Device:
    """The device this rank trains on: its GPU, or its share of the host's memory on the CPU.

    On the CPU (gloo) "fits" means fits in the host's physical memory divided among the ranks on
    it (``MemTotal / local ranks``). On a GPU it is the device's total memory. Every rank must
    decide the same layout, or the job hangs in its first collective: under torch.distributed
    the smallest memory of any rank is taken (one all-reduce, once per process), so a job on
    nodes of mixed GPUs (40 and 80 GB) plans for the 40.
    """
    import dataclasses

    import torch.distributed as dist

    own = _own_device(local_world_size)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return own
    key = (local_world_size, dist.get_world_size())
    if key not in _AGREED:
        import torch

        memory = torch.tensor([own.memory_gib], dtype=torch.float64,
                              device="cuda" if own.kind == "cuda" else "cpu")
        dist.all_reduce(memory, op=dist.ReduceOp.MIN)
        _AGREED[key] = float(memory.item())
    return dataclasses.replace(own, memory_gib=_AGREED[key])


# The job's smallest device memory, per (local world, world): agreed once per process.
_AGREED: dict[tuple[int, int], float] = {}


def _own_device(local_world_size: int) -> Device:
    import torch

    if torch.cuda.is_available():
        from megatron_tinyllama.train.metrics import _PEAK_TFLOPS

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        peak = next((v for k, v in _PEAK_TFLOPS.items() if k in props.name), DEVICES["A100-40G"].peak_tflops)
        links = 360.0 if ("H100" in props.name or "H200" in props.name) else 230.0
        return Device(props.name, props.total_memory / GIB, peak, links, "cuda")
    import psutil

    return Device("cpu", psutil.virtual_memory().total / GIB / max(1, local_world_size), CPU_PEAK_TFLOPS,
                  CPU_GLOO_GBYTES_PER_S, "cpu")


@dataclass(frozen=True)
class ZeroMemorySettings:
    """What of the DeepSpeed config decides memory (from :func:`settings_from_ds_config`)."""

    stage: int
    hpz_ranks: int = 1
    param_bytes: int = 2
    """16-bit parameters (bf16/fp16) or fp32: 4."""
    fp32_master: bool = True
    """Whether fp32 master weights are kept apart from the parameters (all but stage 0 in fp32)."""
    comm_bytes: int = 4
    """Bytes per gradient element reduced (communication_data_type)."""
    reduce_bucket_numel: int = 50_000_000
    prefetch_bucket_numel: int = 50_000_000
    persistence_threshold: int = 100_000
    overlap_comm: bool = True
    micro_batch_size: int = 1
    accumulation_steps: int = 1


def settings_from_ds_config(ds: dict) -> ZeroMemorySettings:
    """:class:`ZeroMemorySettings` of a DeepSpeed config dict (as build_ds_config returns it)."""
    zero = ds.get("zero_optimization", {})
    half = bool(ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled"))
    stage = int(zero.get("stage", 0))
    comm = ds.get("communication_data_type")
    return ZeroMemorySettings(
        stage=stage, hpz_ranks=int(zero.get("zero_hpz_partition_size", 1) or 1), param_bytes=2 if half else 4,
        fp32_master=half or stage > 0, comm_bytes=4 if (comm == "fp32" or not half) else 2,
        reduce_bucket_numel=int(zero.get("reduce_bucket_size", 500_000_000)),
        prefetch_bucket_numel=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)),
        overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
        micro_batch_size=int(ds.get("train_micro_batch_size_per_gpu", 1)),
        accumulation_steps=int(ds.get("gradient_accumulation_steps", 1)),
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds, by what holds them."""

    parameters: float
    """The parameters as the model computes with them (whole, or this rank's ZeRO-3 shard)."""
    gradients: float
    """Gradient buffers kept from step to step (BF16_Optimizer's fp32 buffer, ZeRO-3's partition)."""
    optimizer: float
    """fp32 master weights and Adam's two moments (this rank's shard)."""
    zero_buffers: float
    """ZeRO-3's reduction bucket, persistent whole parameters, hpZ's secondary copy."""
    transient: float
    """During a step: gradients before their reduction, reduction buckets, gathered parameters."""
    activations: float
    """Saved for backward by one micro-batch (the peak is at the end of its forward)."""
    loss: float
    """The logits and the loss's temporaries."""
    reserve: float
    """Outside the tensors: the CUDA context and the caching allocator's slack (0 on the CPU)."""

    @property
    def model_states(self) -> float:
        """What stays allocated between steps."""
        return self.parameters + self.gradients + self.optimizer + self.zero_buffers

    @property
    def peak_allocated(self) -> float:
        """``torch.cuda.max_memory_allocated`` over a step, predicted."""
        return self.model_states + self.transient + self.activations + self.loss

    @property
    def total(self) -> float:
        """What the device must have: the peak allocated plus the reserve."""
        return self.peak_allocated + self.reserve

    def fits(self, device: Device, margin: float = FIT_MARGIN) -> bool:
        return self.total * (1.0 + margin) <= device.memory_gib * GIB

    def as_gib(self) -> dict[str, float]:
        parts = {f.name: getattr(self, f.name) / GIB for f in fields(self)}
        return {**parts, "model_states": self.model_states / GIB, "peak_allocated": self.peak_allocated / GIB,
                "total": self.total / GIB}


def _shard(numel: int, ranks: int) -> int:
    return math.ceil(numel / max(1, ranks))


def model_state_bytes(model_cfg: ModelConfig, zero: ZeroMemorySettings, *, data_parallel_size: int,
                      tensor_parallel_size: int = 1, resident_only: bool = False) -> dict[str, float]:
    """Model states of one rank: parameters, gradients, optimizer, ZeRO buffers, transient.

    Args:
        resident_only: count a buffer only as far as it is written (the CPU, where pages never
            written are not resident); on a GPU the allocator holds all of it.
    """
    from megatron_tinyllama.parallel.comm_model import parameter_trace

    trace = parameter_trace(model_cfg, tensor_parallel_size)
    total = sum(p.numel for p in trace)
    modules: dict[str, int] = {}
    for p in trace:
        modules[p.module] = modules.get(p.module, 0) + p.numel
    largest = max(modules.values())
    n, h, stage = data_parallel_size, zero.param_bytes, zero.stage
    master = 4 * _shard(total, n) if zero.fp32_master else 0
    moments = 8 * _shard(total, n)
    grad_accum = 4  # fp32 accumulation (data_types.grad_accum_dtype) under bf16/fp16, fp32 itself
    bucket = zero.reduce_bucket_numel if not resident_only else min(zero.reduce_bucket_numel, total)
    out = dict(parameters=0.0, gradients=0.0, optimizer=float(master + moments), zero_buffers=0.0, transient=0.0)
    if stage == 0:
        out.update(parameters=h * total, transient=h * total,
                   optimizer=float((4 * total if h == 2 else 0) + 8 * total))
    elif stage == 1 and h == 2:
        # BF16_Optimizer: bf16 flat parameters, an fp32 gradient buffer of the whole model (kept),
        # the bf16 gradients of backward (zeroed, not freed, until the step ends).
        out.update(parameters=h * total, gradients=grad_accum * total, transient=h * total)
    elif stage in (1, 2):
        # DeepSpeedZeroOptimizer: flat parameters; during the step the 16-bit gradients (stage 1:
        # all of them; stage 2: reduced bucket by bucket), the fp32 gradient partition and the
        # reduction buckets (two with overlap_comm).
        buckets = (2 if zero.overlap_comm else 1) * bucket * h
        grads = h * total if stage == 1 else 0
        out.update(parameters=h * total, transient=grads + grad_accum * _shard(total, n) + buckets)
    elif stage == 3:
        persistent = sum(p.numel for p in trace if p.numel <= zero.persistence_threshold)
        secondary = h * _shard(total - persistent, zero.hpz_ranks) if zero.hpz_ranks > 1 else 0
        gathered = min(total, zero.prefetch_bucket_numel + largest)
        out.update(parameters=h * _shard(total, n), gradients=grad_accum * _shard(total, n),
                   zero_buffers=zero.comm_bytes * bucket + h * persistent + secondary,
                   # Gathered ahead by the prefetcher, and one layer's 16-bit gradient before it
                   # reaches the bucket (DeepSpeed's estimator: 4 x largest layer, the same at h=2).
                   transient=h * gathered + h * largest)
    else:
        raise ValueError(f"unknown ZeRO stage {stage}")
    return {k: float(v) for k, v in out.items()}


def activation_bytes(model_cfg: ModelConfig, *, micro_batch_size: int, tensor_parallel_size: int = 1,
                     activation_bytes_per_element: int = 2, recompute: bool = False) -> float:
    """What one micro-batch's forward keeps for backward, at its peak (the start of backward).

    Per layer and token, 16-bit: its input and the normed input (h each: replicated under TP),
    queries, keys, values and the attention output (h + 2 kv + h, split over TP), the second norm's
    input and output (2h), the MLP's fc1 output (2 ffn, the SwiGLU's input) and the SwiGLU output
    (ffn); in fp32 the two norms' reciprocal RMS and the attention's log-sum-exp per head. With
    ``recompute`` (``model.activation_checkpointing``: megatron-core's full recompute, one layer per
    checkpoint) a layer keeps only its input, and one layer's whole set is rebuilt in backward.
    """
    tp = tensor_parallel_size
    tokens = micro_batch_size * model_cfg.seq_length
    d, ffn = model_cfg.hidden_size, model_cfg.ffn_hidden_size
    kv = model_cfg.num_query_groups * model_cfg.head_dim
    a = activation_bytes_per_element
    per_token_layer = a * (4 * d + (2 * d + 2 * kv + 3 * ffn) / tp) + 4 * (2 + model_cfg.num_attention_heads / tp)
    head = a * 2 * d  # the final norm's input and output (the output layer's input)
    if recompute:
        return float(tokens * (model_cfg.num_layers * a * d + per_token_layer + head))
    return float(tokens * (model_cfg.num_layers * per_token_layer + head))


def loss_bytes(model_cfg: ModelConfig, *, micro_batch_size: int, tensor_parallel_size: int = 1,
               logit_bytes: int = 2, backend: str = "chunked") -> float:
    """The logits (this TP rank's vocabulary slice) and the loss backend's temporaries.

    ``plain``: an fp32 copy of the logits and megatron-core's fp32 softmax and its gradient (three
    fp32 copies at the peak, docs/performance.md); ``megatron_fused``: two fp32 copies; ``chunked``
    and ``liger``: the gradient is written into the logits, plus one chunk's fp32 temporaries.
    """
    from megatron_tinyllama.model.build import padded_vocab_size

    tokens = micro_batch_size * model_cfg.seq_length
    vocab = padded_vocab_size(model_cfg.vocab_size, tensor_parallel_size) // tensor_parallel_size
    logits = tokens * vocab
    extra = {"plain": 3 * 4 * logits, "megatron_fused": 2 * 4 * logits}.get(
        backend, 2 * 4 * min(logits, CHUNK_LOGIT_ELEMENTS))
    return float(logit_bytes * logits + extra)


def estimate_memory(model_cfg: ModelConfig, ds_config: dict, *, data_parallel_size: int,
                    tensor_parallel_size: int = 1, device_kind: str = "cuda",
                    cross_entropy_backend: Optional[str] = None) -> MemoryEstimate:
    """Memory of one rank running ``ds_config`` (as build_ds_config returns it) for this model.

    Args:
        device_kind: ``cuda`` (whole buffers, CUDA context, allocator slack) or ``cpu``.
        cross_entropy_backend: the loss backend that runs; None: the model's, with 'auto' as
            model/kernels.py resolves it (chunked on CUDA, plain on the CPU).
    """
    zero = settings_from_ds_config(ds_config)
    states = model_state_bytes(model_cfg, zero, data_parallel_size=data_parallel_size,
                               tensor_parallel_size=tensor_parallel_size, resident_only=device_kind == "cpu")
    backend = cross_entropy_backend or model_cfg.cross_entropy_backend
    if backend == "auto":
        backend = "chunked" if device_kind == "cuda" else "plain"
    a = zero.param_bytes
    activations = activation_bytes(model_cfg, micro_batch_size=zero.micro_batch_size,
                                   tensor_parallel_size=tensor_parallel_size, activation_bytes_per_element=a,
                                   recompute=model_cfg.activation_checkpointing)
    loss = loss_bytes(model_cfg, micro_batch_size=zero.micro_batch_size, tensor_parallel_size=tensor_parallel_size,
                      logit_bytes=a, backend=backend)
    peak = sum(states.values()) + activations + loss
    reserve = CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK * peak if device_kind == "cuda" else 0.0
    return MemoryEstimate(**states, activations=activations, loss=loss, reserve=reserve)


def deepspeed_estimate(model_cfg: ModelConfig, stage: int, *, data_parallel_size: int,
                       tensor_parallel_size: int = 1) -> float:
    """DeepSpeed's own model-states estimate for this model (its stage-2 formula for stages 1 and 2),
    for comparison: see the module docstring for where and why this model differs."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from megatron_tinyllama.parallel.comm_model import parameter_trace

    trace = parameter_trace(model_cfg, tensor_parallel_size)
    total = sum(p.numel for p in trace)
    modules: dict[str, int] = {}
    for p in trace:
        modules[p.module] = modules.get(p.module, 0) + p.numel
    if stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(total, max(modules.values()), data_parallel_size, 1,
                                                          cpu_offload=False, cpu_offload_params=False)
    else:
        _, gpu = estimate_zero2_model_states_mem_needs(total, data_parallel_size, 1, cpu_offload=False)
    return float(gpu)
