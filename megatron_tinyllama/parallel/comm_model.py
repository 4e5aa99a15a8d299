"""Per-step communication of a ZeRO job, in bytes and seconds, and the tokens/s it allows.

This module owns the arithmetic that says, before a cluster is booked, what DeepSpeed will send
over which links for one optimizer step of this stack (ZeRO-1, -2, -3, and ZeRO-3 with node-local
parameter sharding, ZeRO++ hpZ), and what that does to throughput. It counts the collectives
DeepSpeed 0.19 actually issues with the DeepSpeed config this stack builds
(:mod:`megatron_tinyllama.engine.ds_config`: bf16 parameters, gradients reduced in fp32), as its
own communication logger records them (tests/distributed/test_comm_model.py checks the counts
against that logger on gloo ranks):

* ZeRO-1 (DeepSpeed's BF16_Optimizer in bf16): one all-reduce of the fp32 gradients per step,
  then one all-gather of the updated bf16 parameter shards.
* ZeRO-2: an all-reduce of the fp32 gradients after every micro-batch (DeepSpeed's stage-2
  reduction all-reduces its buckets, ``use_multi_rank_bucket_allreduce``), and the ZeRO-1
  parameter all-gather once per step.
* ZeRO-3: per micro-batch an all-gather of every non-persistent parameter shard for forward, a
  second one in backward for the parameters DeepSpeed released in between (see
  :func:`backward_regathered`), and a reduce-scatter of the fp32 gradients; once per step an
  all-gather of the persistent (small) parameters.
* ZeRO-3 + hpZ (``zero_hpz_partition_size`` = k ranks per node): the first forward of a step
  all-gathers from the primary shards (all data-parallel ranks, across nodes); every other
  parameter all-gather of the step reads the secondary shards inside the node.

Time per collective is the bytes each rank puts on the wire (ring algorithms: all-reduce
2(n-1)/n x size, all-gather and reduce-scatter (n-1)/n x full size) over the group's bus
bandwidth: the intra-node bandwidth, or, for a group that spans nodes, the smaller of that and
the per-node inter-node bandwidth (a ring crosses each node boundary once per channel, so a node's
NICs carry one rank's bus bytes). That is the nccl-tests "busbw" model; it ignores latency, so it
flatters small messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_tinyllama.config import ModelConfig

@dataclass(frozen=True)
class ClusterShape:
    """Nodes x GPUs per node (a hostfile's shape) and the links between them."""

    nodes: int
    gpus_per_node: int
    intra_node_gbytes_per_s: float = 230.0
    """Bus bandwidth of a collective inside one node, GB/s (nccl-tests busbw; A100 NVLink3 ~230)."""
    inter_node_gbytes_per_s: float = 25.0
    """Bus bandwidth between nodes per node, GB/s (all of a node's NICs: 1 x HDR 200 Gb/s = 25)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed ZeRO settings that decide what is communicated."""

    stage: int = 3
    hpz_ranks: int = 1
    """Data-parallel ranks per node-local (secondary) parameter partition; 1: no hpZ."""
    param_bytes: int = 2
    """Bytes per parameter element gathered (bf16: 2)."""
    grad_bytes: int = 4
    """Bytes per gradient element reduced (communication_data_type fp32: 4)."""
    persistence_threshold: int = 100_000
    """stage3_param_persistence_threshold: parameters this small stay whole on every rank."""
    prefetch_bucket_numel: int = 50_000_000
    """stage3_prefetch_bucket_size."""
    max_reuse_distance_numel: int = 1_000_000_000
    """stage3_max_reuse_distance."""


def zero_settings_from_ds_config(ds_config: dict) -> ZeroSettings:
    """:class:`ZeroSettings` from a DeepSpeed config dict (as build_ds_config returns it)."""
    zero = ds_config.get("zero_optimization", {})
    half = ds_config.get("bf16", {}).get("enabled") or ds_config.get("fp16", {}).get("enabled")
    comm = ds_config.get("communication_data_type")
    grad_bytes = 4 if (comm == "fp32" or not half) else 2
    return ZeroSettings(
        stage=int(zero.get("stage", 0)),
        hpz_ranks=int(zero.get("zero_hpz_partition_size", 1) or 1),
        param_bytes=2 if half else 4,
        grad_bytes=grad_bytes,
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)),
        prefetch_bucket_numel=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
        max_reuse_distance_numel=int(zero.get("stage3_max_reuse_distance", 1_000_000_000)),
    )


@dataclass(frozen=True)
class Collective:
    """One kind of collective in a step, totalled over the step, for one rank."""

    what: str
    op: str
    """DeepSpeed's name for it, as its communication logger records it."""
    logged_bytes: float
    """Sum of the message sizes DeepSpeed's logger records (its convention: the input tensor,
    i.e. the shard for all-gather, the full buffer for reduce-scatter and all-reduce)."""
    wire_bytes: float
    """Bytes this rank sends per step (ring algorithms)."""
    group_size: int
    spans_nodes: bool
    seconds: float = 0.0


@dataclass
class CommEstimate:
    """What one optimizer step costs a rank, and the throughput that follows."""

    collectives: list[Collective] = field(default_factory=list)
    compute_seconds: float = 0.0
    tokens_per_step: int = 0
    world_size: int = 1

    @property
    def comm_seconds(self) -> float:
        return sum(c.seconds for c in self.collectives)

    @property
    def wire_bytes(self) -> float:
        return sum(c.wire_bytes for c in self.collectives)

    def logged_bytes(self, op: str) -> float:
        return sum(c.logged_bytes for c in self.collectives if c.op == op)

    @property
    def tokens_per_s_serial(self) -> float:
        """Communication not overlapped with compute (a lower bound)."""
        return self.tokens_per_step / (self.compute_seconds + self.comm_seconds)

    @property
    def tokens_per_s_overlapped(self) -> float:
        """Communication fully hidden behind compute where it can be (an upper bound)."""
        return self.tokens_per_step / max(self.compute_seconds, self.comm_seconds)


@dataclass(frozen=True)
class _Param:
    module: str
    numel: int


def parameter_trace(model_cfg: ModelConfig, tensor_parallel_size: int = 1) -> list[_Param]:
    """This TP rank's parameters in forward order, one entry per tensor (DeepSpeed's trace order)."""
    from megatron_tinyllama.model.build import padded_vocab_size

    tp = tensor_parallel_size
    d, ffn, kv = model_cfg.hidden_size, model_cfg.ffn_hidden_size, model_cfg.num_query_groups * model_cfg.head_dim
    vocab = padded_vocab_size(model_cfg.vocab_size, tp) // tp
    norm = [d] if model_cfg.normalization == "RMSNorm" else [d, d]
    head_norm = [model_cfg.head_dim] if model_cfg.normalization == "RMSNorm" else [model_cfg.head_dim] * 2
    trace = [_Param("embedding", vocab * d)]
    for layer in range(model_cfg.num_layers):
        prefix = f"layers.{layer}"
        trace += [_Param(f"{prefix}.input_layernorm", n) for n in norm]
        trace.append(_Param(f"{prefix}.linear_qkv", d * (d + 2 * kv) // tp))
        if model_cfg.qk_layernorm:
            trace += [_Param(f"{prefix}.q_layernorm", n) for n in head_norm]
            trace += [_Param(f"{prefix}.k_layernorm", n) for n in head_norm]
        trace.append(_Param(f"{prefix}.linear_proj", d * d // tp))
        trace += [_Param(f"{prefix}.pre_mlp_layernorm", n) for n in norm]
        trace.append(_Param(f"{prefix}.linear_fc1", 2 * ffn * d // tp))
        trace.append(_Param(f"{prefix}.linear_fc2", ffn * d // tp))
    trace += [_Param("final_layernorm", n) for n in norm]
    if model_cfg.untie_embeddings:
        trace.append(_Param("output_layer", vocab * d))
    return trace


def backward_regathered(trace: list[_Param], zero: ZeroSettings) -> list[_Param]:
    """The non-persistent parameters ZeRO-3 releases after forward and gathers again in backward.

    DeepSpeed keeps a parameter gathered when its next use is near: its reuse-distance rule keeps
    it when fewer than ``stage3_max_reuse_distance`` elements are used between its forward and
    its backward use, and its prefetcher keeps what its look-ahead has already passed over.
    Measured on DeepSpeed 0.19.8 (tests/distributed/test_comm_model.py, docs/performance.md):

    * no prefetching (bucket 0): the reuse-distance rule alone, exactly (this function);
    * any non-zero bucket: the look-ahead reaches the backward pass early and keeps nearly
      everything. Nothing is counted here, a lower bound: DeepSpeed was seen to gather the input
      embedding again in some shapes (plus up to a layer when the bucket is about one layer),
      i.e. at most the first ``stage3_prefetch_bucket_size`` elements of the forward trace.
    """
    if zero.prefetch_bucket_numel > 0:
        return []
    # Reuse distance: elements used (forward then backward, persistent ones too) strictly
    # between a parameter's forward use and its backward use.
    numel = [p.numel for p in trace]
    after = [sum(numel[i + 1:]) for i in range(len(trace))]
    modules_numel: dict[str, int] = {}
    for p in trace:
        modules_numel[p.module] = modules_numel.get(p.module, 0) + p.numel
    regathered = []
    for i, p in enumerate(trace):
        if p.numel <= zero.persistence_threshold:
            continue
        # Between the two uses: the rest of forward after this module, and the same in backward.
        own_module_after = sum(q.numel for q in trace[i + 1:] if q.module == p.module)
        between = 2 * (after[i] - own_module_after)
        if between >= zero.max_reuse_distance_numel:
            regathered.append(p)
    return regathered


def _group_seconds(wire_bytes: float, spans_nodes: bool, cluster: ClusterShape) -> float:
    bandwidth = cluster.intra_node_gbytes_per_s
    if spans_nodes:
        bandwidth = min(bandwidth, cluster.inter_node_gbytes_per_s)
    return wire_bytes / (bandwidth * 1e9)


def _collective(what: str, op: str, logged: float, group: int, spans: bool,
                cluster: ClusterShape) -> Collective:
    if group <= 1:
        wire = 0.0
    elif op == "all_reduce":
        wire = 2.0 * (group - 1) / group * logged
    elif op == "all_gather_into_tensor":  # logged: the shard each rank contributes
        wire = (group - 1) * logged
    else:  # reduce_scatter_tensor, logged: the full input
        wire = (group - 1) / group * logged
    return Collective(what, op, logged, wire, group, spans and group > 1,
                      _group_seconds(wire, spans and group > 1, cluster))


def step_communication(model_cfg: ModelConfig, cluster: ClusterShape, zero: ZeroSettings, *,
                       micro_batch_size: int, accumulation_steps: int, tensor_parallel_size: int = 1,
                       mfu: float = 0.56, peak_tflops: float = 312.0) -> CommEstimate:
    """Per-rank communication and compute of one optimizer step.

    Args:
        model_cfg: model shape.
        cluster: nodes x GPUs per node and link bandwidths.
        zero: ZeRO stage and the DeepSpeed settings that matter (:func:`zero_settings_from_ds_config`).
        micro_batch_size, accumulation_steps: per data-parallel rank.
        tensor_parallel_size: TP degree (ranks of one TP group share a node; DP groups stride them).
        mfu: model-FLOPs utilisation of the compute (train/metrics.py's FLOP count); the paper's
            A100 runs reached ~0.56.
        peak_tflops: the GPU's dense bf16 peak (A100: 312).
    """
    from megatron_tinyllama.train.metrics import flops_per_token

    tp = tensor_parallel_size
    dp = cluster.world_size // tp
    if dp * tp != cluster.world_size or cluster.gpus_per_node % tp:
        raise ValueError(f"TP={tp} must divide the GPUs per node ({cluster.gpus_per_node})")
    dp_spans = cluster.nodes > 1
    trace = parameter_trace(model_cfg, tp)
    total = sum(p.numel for p in trace)
    tokens_per_rank = micro_batch_size * accumulation_steps * model_cfg.seq_length
    estimate = CommEstimate(tokens_per_step=tokens_per_rank * dp, world_size=cluster.world_size)
    estimate.compute_seconds = (tokens_per_rank * flops_per_token(model_cfg) / tp) / (mfu * peak_tflops * 1e12)
    c = estimate.collectives
    accum = accumulation_steps
    grad_full = total * zero.grad_bytes
    # ZeRO-1/2 shards: each parameter group is flattened and padded to a multiple of the DP size;
    # two groups here (decayed matrices, undecayed norms).
    shard = lambda numel, ranks: math.ceil(numel / ranks)  # noqa: E731
    if zero.stage in (1, 2):
        decay = sum(p.numel for p in trace if "norm" not in p.module)
        flat_shard = shard(decay, dp) + shard(total - decay, dp)
        if zero.stage == 1:
            c.append(_collective("gradient all-reduce (once per step)", "all_reduce", grad_full, dp, dp_spans, cluster))
        else:
            c.append(_collective("gradient all-reduce (every micro-batch)", "all_reduce", grad_full * accum, dp,
                                 dp_spans, cluster))
        c.append(_collective("updated parameter all-gather", "all_gather_into_tensor",
                             flat_shard * zero.param_bytes, dp, dp_spans, cluster))
    elif zero.stage == 3:
        movable = [p for p in trace if p.numel > zero.persistence_threshold]
        persistent = [p for p in trace if p.numel <= zero.persistence_threshold]
        primary = sum(shard(p.numel, dp) for p in movable) * zero.param_bytes
        regathered = backward_regathered(trace, zero)
        k = zero.hpz_ranks
        if k > 1:
            if dp % k:
                raise ValueError(f"hpZ partition of {k} ranks does not divide the data-parallel size {dp}")
            secondary = sum(shard(p.numel, k) for p in movable) * zero.param_bytes
            secondary_spans = k * tp > cluster.gpus_per_node
            c.append(_collective("forward all-gather, primary shards (first micro-batch)",
                                 "all_gather_into_tensor", primary, dp, dp_spans, cluster))
            c.append(_collective("forward all-gather, node-local shards (other micro-batches)",
                                 "all_gather_into_tensor", secondary * (accum - 1), k, secondary_spans, cluster))
            back = sum(shard(p.numel, k) for p in regathered) * zero.param_bytes
            c.append(_collective("backward re-gather, node-local shards", "all_gather_into_tensor",
                                 back * accum, k, secondary_spans, cluster))
        else:
            c.append(_collective("forward parameter all-gather", "all_gather_into_tensor", primary * accum,
                                 dp, dp_spans, cluster))
            back = sum(shard(p.numel, dp) for p in regathered) * zero.param_bytes
            c.append(_collective("backward parameter re-gather", "all_gather_into_tensor", back * accum,
                                 dp, dp_spans, cluster))
        c.append(_collective("gradient reduce-scatter (every micro-batch)", "reduce_scatter_tensor",
                             grad_full * accum, dp, dp_spans, cluster))
        c.append(_collective("persistent parameter all-gather (once per step)", "all_gather_into_tensor",
                             sum(shard(p.numel, dp) for p in persistent) * zero.param_bytes, dp, dp_spans, cluster))
    elif zero.stage == 0:
        c.append(_collective("gradient all-reduce (once per step)", "all_reduce", grad_full, dp, dp_spans, cluster))
    else:
        raise ValueError(f"unknown ZeRO stage {zero.stage}")
    return estimate


VARIANTS = {"zero1": (1, False), "zero2": (2, False), "zero3": (3, False), "zero3-hpz": (3, True)}
"""Named set-ups: ZeRO stage and whether parameters are also sharded node-locally (hpZ)."""


def estimate_for_recipe(cfg, cluster: ClusterShape, variant: str = "zero3", *, mfu: float = 0.56,
                        peak_tflops: float = 312.0) -> CommEstimate:
    """:func:`step_communication` for a recipe (:class:`~megatron_tinyllama.config.JobConfig`) on
    ``cluster`` in one of :data:`VARIANTS`, with the DeepSpeed config this stack builds there."""
    import dataclasses

    from megatron_tinyllama.engine.ds_config import batch_geometry, build_ds_config

    stage, hpz = VARIANTS[variant]
    parallel = dataclasses.replace(cfg.parallel, zero_stage=stage, hpz_partition_size=0 if hpz else 1,
                                   ds_config="zero3_node_local.json" if hpz else "zero3.json")
    cfg = dataclasses.replace(cfg, parallel=parallel)
    dp = cluster.world_size // parallel.tensor_parallel_size
    ds = build_ds_config(cfg, dp, cluster.gpus_per_node)
    geometry = batch_geometry(cfg, dp)
    return step_communication(cfg.model, cluster, zero_settings_from_ds_config(ds),
                              micro_batch_size=geometry.micro_batch_size,
                              accumulation_steps=geometry.gradient_accumulation_steps,
                              tensor_parallel_size=parallel.tensor_parallel_size, mfu=mfu, peak_tflops=peak_tflops)


def format_estimate(variant: str, estimate: CommEstimate) -> str:
    """A plain-text table of one estimate."""
    lines = [f"{variant}: {estimate.world_size} GPUs, {estimate.tokens_per_step:,} tokens/step"]
    lines.append(f"  {'collective':58s} {'op':22s} {'logged MB':>10s} {'wire MB':>9s} {'group':>5s} "
                 f"{'nodes':>5s} {'s':>7s}")
    for c in estimate.collectives:
        lines.append(f"  {c.what:58s} {c.op:22s} {c.logged_bytes / 1e6:10.1f} {c.wire_bytes / 1e6:9.1f} "
                     f"{c.group_size:5d} {'many' if c.spans_nodes else 'one':>5s} {c.seconds:7.3f}")
    per_gpu = lambda tps: tps / estimate.world_size  # noqa: E731
    lines.append(f"  compute {estimate.compute_seconds:.3f} s + communication {estimate.comm_seconds:.3f} s "
                 f"per step ({estimate.wire_bytes / 1e9:.2f} GB on the wire per GPU)")
    lines.append(f"  tokens/s: {estimate.tokens_per_s_serial:,.0f} ({per_gpu(estimate.tokens_per_s_serial):,.0f}"
                 f"/GPU) not overlapped .. {estimate.tokens_per_s_overlapped:,.0f} "
                 f"({per_gpu(estimate.tokens_per_s_overlapped):,.0f}/GPU) fully overlapped")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """``tools/comm_model.py``: estimate a recipe's communication on a cluster shape."""
    import argparse
    import json
    import sys

    from megatron_tinyllama.config import ConfigError, load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="recipe YAML (model shape, batch, precision)")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    shape = parser.add_mutually_exclusive_group(required=True)
    shape.add_argument("--hostfile", help="deepspeed hostfile: nodes = hosts, GPUs per node = slots")
    shape.add_argument("--nodes", type=int, help="number of nodes (with --gpus-per-node)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--intra-node-gbps", type=float, default=230.0,
                        help="collective bus bandwidth inside a node, GB/s (A100 NVLink3: ~230)")
    parser.add_argument("--inter-node-gbps", type=float, default=25.0,
                        help="bandwidth between nodes per node, GB/s (1 x 200 Gb/s HDR: 25)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {list(VARIANTS)}")
    parser.add_argument("--mfu", type=float, default=0.56, help="compute efficiency (paper's A100 runs: ~0.56)")
    parser.add_argument("--peak-tflops", type=float, default=312.0, help="dense bf16 peak per GPU (A100: 312)")
    parser.add_argument("--json", help="also write the estimates here")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.hostfile:
            from megatron_tinyllama.launch import read_hostfile

            slots = set(read_hostfile(args.hostfile).values())
            if len(slots) != 1:
                raise ConfigError(f"{args.hostfile}: hosts have different slot counts {sorted(slots)}")
            nodes, gpus = len(read_hostfile(args.hostfile)), slots.pop()
        else:
            nodes, gpus = args.nodes, args.gpus_per_node
        cluster = ClusterShape(nodes, gpus, args.intra_node_gbps, args.inter_node_gbps)
        report = {}
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            if variant not in VARIANTS:
                raise ConfigError(f"--variants: unknown {variant!r}; known {list(VARIANTS)}")
            estimate = estimate_for_recipe(cfg, cluster, variant, mfu=args.mfu, peak_tflops=args.peak_tflops)
            print(format_estimate(variant, estimate))
            report[variant] = {"collectives": [c.__dict__ for c in estimate.collectives],
                               "compute_seconds": estimate.compute_seconds, "comm_seconds": estimate.comm_seconds,
                               "tokens_per_s_serial": estimate.tokens_per_s_serial,
                               "tokens_per_s_overlapped": estimate.tokens_per_s_overlapped}
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps({"nodes": nodes, "gpus_per_node": gpus, **report}, indent=1))
    return 0
