"""A recipe's layouts side by side on a device and a cluster shape: memory, bytes, speed, fit.

This module owns the comparison behind ``parallel.zero_stage: auto`` (the rule that picks is
:func:`megatron_tinyllama.engine.ds_config.choose_auto_stage`) and the ``tinyllama-layout``
command: for each layout (ZeRO-1, ZeRO-2, ZeRO-3, ZeRO-3 with node-local sharding) its memory per
GPU (:mod:`~megatron_tinyllama.parallel.memory_model`), its bytes on the wire per step
(:mod:`~megatron_tinyllama.parallel.comm_model`), a predicted step time and tokens/s, and
whether it fits.

The predicted step is a roofline: compute plus communication, not overlapped (the conservative
end of the communication model's range). Compute is the step's tokens per GPU x
``flops_per_token`` / TP / (peak x efficiency), with the efficiency each stage reached on one H200
with the levers ``auto`` gives it (docs/performance.md, TinyLlama 1.1B, micro-batch 8: ZeRO-1 with
compiled layers 52.0% MFU, ZeRO-2 49.0%, ZeRO-3 eager with kernels 42.7%: its parameter hooks cost
compute time even where nothing is sent). Communication is the bytes each rank sends over the
link bandwidths (comm_model's busbw model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron_tinyllama.config import ConfigError, JobConfig
from megatron_tinyllama.parallel.comm_model import (
    ClusterShape,
    CommEstimate,
    step_communication,
    zero_settings_from_ds_config,
)
from megatron_tinyllama.parallel.memory_model import GIB, Device, MemoryEstimate, estimate_memory

STAGE_MFU = {0: 0.520, 1: 0.520, 2: 0.490, 3: 0.427}
"""Compute efficiency per ZeRO stage: MFU measured on one H200 (docs/performance.md)."""

INTER_NODE_GBYTES_PER_S = 25.0
"""Between nodes, per node, when not given: one HDR 200 Gb/s NIC (comm_model's default)."""

VARIANTS = {"zero1": (1, False), "zero2": (2, False), "zero3": (3, False), "zero3-hpz": (3, True)}
"""Layouts compared: ZeRO stage, and whether parameters are also sharded node-locally (hpZ)."""


@dataclass(frozen=True)
class LayoutOption:
    """One layout of a recipe on a device and a cluster shape, predicted."""

    name: str
    stage: int
    hpz_ranks: int
    """Data-parallel ranks per node-local group (1: off)."""
    memory: MemoryEstimate
    comm: CommEstimate
    device: Device

    @property
    def fits(self) -> bool:
        return self.memory.fits(self.device)

    @property
    def step_seconds(self) -> float:
        return self.comm.compute_seconds + self.comm.comm_seconds

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.comm.tokens_per_s_serial / self.comm.world_size

    @property
    def wire_gbytes(self) -> float:
        return self.comm.wire_bytes / 1e9

    def summary(self) -> str:
        """``ZeRO-1: 31.2 of 39.4 GiB, 10.3 GB on the wire per step``."""
        label = f"ZeRO-{self.stage}" + (f" + node-local sharding over {self.hpz_ranks}" if self.hpz_ranks > 1 else "")
        return (f"{label}: {self.memory.total / GIB:.1f} of {self.device.memory_gib:.1f} GiB, "
                f"{self.wire_gbytes:.1f} GB on the wire per step")


def cluster_of(world_size: int, local_world_size: int, device: Device,
               inter_node_gbytes_per_s: Optional[float] = None) -> ClusterShape:
    """Nodes x ranks per node of a world, with this device's links."""
    local = max(1, min(local_world_size, world_size))
    nodes = -(-world_size // local)
    inter = inter_node_gbytes_per_s if inter_node_gbytes_per_s is not None else (
        INTER_NODE_GBYTES_PER_S if device.kind == "cuda" else device.intra_node_gbytes_per_s)
    return ClusterShape(nodes, local, device.intra_node_gbytes_per_s, inter)


def layout_option(cfg: JobConfig, world_size: int, local_world_size: int, device: Device, stage: int,
                  hpz: bool = False, inter_node_gbytes_per_s: Optional[float] = None) -> LayoutOption:
    """The recipe at ZeRO ``stage`` (``hpz``: node-local sharding over a node) on this world.

    Raises:
        ConfigError: a layout this world cannot run (batch geometry, node-local sharding).
    """
    from megatron_tinyllama.engine.ds_config import build_ds_config, planned_layout

    par = cfg.parallel
    ds_name = par.ds_config or ("zero3_node_local.json" if hpz else None)
    node_local = par.hpz_partition_size if par.hpz_partition_size > 1 else 0  # 0: a node
    parallel = dataclasses.replace(par, zero_stage=stage, hpz_partition_size=node_local if hpz else 1,
                                   ds_config=ds_name)
    staged = dataclasses.replace(cfg, parallel=parallel)
    tp = par.tensor_parallel_size
    dp = world_size // tp
    layout = planned_layout(staged, world_size, local_world_size)
    ds = build_ds_config(staged, dp, local_world_size)
    cluster = cluster_of(world_size, local_world_size, device, inter_node_gbytes_per_s)
    try:
        comm = step_communication(cfg.model, cluster, zero_settings_from_ds_config(ds),
                                  micro_batch_size=ds["train_micro_batch_size_per_gpu"],
                                  accumulation_steps=ds["gradient_accumulation_steps"], tensor_parallel_size=tp,
                                  mfu=STAGE_MFU[stage], peak_tflops=device.peak_tflops)
    except ValueError as err:
        raise ConfigError(f"layout ZeRO-{stage} on {cluster.nodes} x {cluster.gpus_per_node}: {err}") from None
    if cfg.model.activation_checkpointing:  # one more forward per step (a third of the compute)
        comm.compute_seconds *= 4.0 / 3.0
    memory = estimate_memory(cfg.model, ds, data_parallel_size=dp, tensor_parallel_size=tp, device_kind=device.kind)
    name = f"zero{stage}" + ("-hpz" if layout.node_local_ranks > 1 else "")
    return LayoutOption(name, stage, layout.node_local_ranks, memory, comm, device)


def layout_options(cfg: JobConfig, world_size: int, local_world_size: int, device: Device,
                   variants: Optional[list[str]] = None,
                   inter_node_gbytes_per_s: Optional[float] = None) -> list[LayoutOption]:
    """Each of ``variants`` (default: all of :data:`VARIANTS`) that this world can run; a node-local
    variant is left out where node-local sharding is off (one node, or one rank per node)."""
    options = []
    for name in variants or list(VARIANTS):
        stage, hpz = VARIANTS[name]
        option = layout_option(cfg, world_size, local_world_size, device, stage, hpz, inter_node_gbytes_per_s)
        if hpz and option.hpz_ranks == 1:
            continue
        options.append(option)
    return options


def format_options(options: list[LayoutOption], chosen: Optional[LayoutOption] = None) -> str:
    """A plain-text table: memory by part, total, wire bytes, predicted tokens/s, fit."""
    device = options[0].device
    head = (f"{'layout':10s} {'params':>7s} {'grads':>6s} {'optim':>6s} {'buffers':>7s} {'step':>6s} "
            f"{'activ':>6s} {'loss':>5s} {'reserve':>7s} {'total':>7s}  {'wire GB':>7s} {'step s':>6s} "
            f"{'tok/s/GPU':>9s}  fits {device.memory_gib:.1f} GiB")
    lines = [head, "  (GiB per GPU; 'step': gradients and gathered parameters during a step)"]
    for o in options:
        m = o.memory.as_gib()
        mark = "yes" if o.fits else "no"
        if chosen is not None and o is chosen:
            mark += "  <- auto"
        lines.append(f"{o.name:10s} {m['parameters']:7.2f} {m['gradients']:6.2f} {m['optimizer']:6.2f} "
                     f"{m['zero_buffers']:7.2f} {m['transient']:6.2f} {m['activations']:6.2f} {m['loss']:5.2f} "
                     f"{m['reserve']:7.2f} {m['total']:7.2f}  {o.wire_gbytes:7.1f} {o.step_seconds:6.2f} "
                     f"{o.tokens_per_s_per_gpu:9,.0f}  {mark}")
    return "\n".join(lines)


def bench_memory_check(results: dict) -> list[dict]:
    """Predicted against measured peak memory for each ``stack-*`` entry of a
    ``benchmarks/bench_throughput.py`` results.json (one GPU, DP 1): the entry's own peak is
    ``peak_memory_gb`` less ``memory_before_gb`` (what earlier entries of its process left
    allocated; recorded since 2026-12-05). An entry without that record is compared only when it is
    the file's first stack entry (``comparable`` False otherwise)."""
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.engine.ds_config import build_ds_config

    rows, first = [], True
    for r in results.get("results", []):
        if not str(r.get("config", "")).startswith("stack-") or r.get("peak_memory_gb") is None:
            continue
        kernels = r.get("kernels") or {}
        cfg = config_from_dict({
            "model": {"preset": results["preset"], "seq_length": results["seq_length"]},
            "parallel": {"zero_stage": r["zero_stage"]},
            "train": {"global_batch_tokens": r["micro_batch"] * results["accumulation"] * results["seq_length"],
                      "micro_batch_size": r["micro_batch"], "precision": results.get("precision", "bf16")}})
        predicted = estimate_memory(cfg.model, build_ds_config(cfg, 1, 1), data_parallel_size=1,
                                    cross_entropy_backend=kernels.get("cross_entropy"))
        before = r.get("memory_before_gb")
        rows.append({"config": r["config"], "micro_batch": r["micro_batch"], "zero_stage": r["zero_stage"],
                     "measured_gib": r["peak_memory_gb"] - (before or 0.0),
                     "predicted_gib": predicted.peak_allocated / GIB, "comparable": before is not None or first})
        first = False
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    """``tinyllama-layout RECIPE --device D --nodes N --gpus-per-node G``: each layout's memory,
    bytes on the wire, predicted tokens/s, which fit, and what ``zero_stage: auto`` picks."""
    import argparse
    import json
    import sys
    from pathlib import Path

    from megatron_tinyllama.config import load_config
    from megatron_tinyllama.engine.ds_config import batch_geometry, choose_auto_stage
    from megatron_tinyllama.parallel.memory_model import DEVICES, device_by_name

    parser = argparse.ArgumentParser(prog="tinyllama-layout", description=(main.__doc__ or "").split("\n")[0])
    parser.add_argument("recipe", nargs="?", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    parser.add_argument("--device", help=f"one of {sorted(DEVICES)} or a memory size in GB")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--inter-node-gbps", type=float, default=None,
                        help=f"bandwidth between nodes per node, GB/s (default {INTER_NODE_GBYTES_PER_S:g}: "
                             "one HDR NIC)")
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--bench", help="instead: a bench_throughput.py results.json, each stack entry's measured "
                                        "peak memory against the prediction")
    args = parser.parse_args(argv)
    if args.bench:
        rows = bench_memory_check(json.loads(Path(args.bench).read_text()))
        for row in rows:
            off = row["predicted_gib"] / row["measured_gib"] - 1
            print(f"{row['config']:28s} mb {row['micro_batch']:3d} ZeRO-{row['zero_stage']}  measured "
                  f"{row['measured_gib']:6.1f} GiB  predicted {row['predicted_gib']:6.1f} ({off:+.1%})"
                  + ("" if row["comparable"] else "  (after earlier entries, no memory_before_gb: not comparable)"))
        return 0
    if not args.recipe or not args.device:
        parser.error("RECIPE and --device are required (or --bench)")
    try:
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ConfigError("--nodes and --gpus-per-node must be >= 1")
        device = device_by_name(args.device)
        cfg = load_config(args.recipe, args.overrides)
        world = args.nodes * args.gpus_per_node
        options = layout_options(cfg, world, args.gpus_per_node, device, inter_node_gbytes_per_s=args.inter_node_gbps)
        auto = choose_auto_stage(cfg, world, args.gpus_per_node, device,
                                         inter_node_gbytes_per_s=args.inter_node_gbps)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    chosen = next((o for o in options if o.stage == auto.stage and o.hpz_ranks == auto.hpz_ranks), None)
    geometry = batch_geometry(cfg, world // cfg.parallel.tensor_parallel_size)
    print(f"{cfg.name or args.recipe}: {world} x {device.name} ({args.nodes} node(s) x {args.gpus_per_node} GPUs), "
          f"TP {cfg.parallel.tensor_parallel_size}, micro-batch {geometry.micro_batch_size} x accumulation "
          f"{geometry.gradient_accumulation_steps}, {cfg.train.precision}, activation recompute "
          f"{'on' if cfg.model.activation_checkpointing else 'off'}")
    print(format_options(options, chosen))
    named = cfg.parallel.zero_stage
    print(f"zero_stage auto -> {auto.reason}")
    if named != "auto":
        print(f"the recipe names zero_stage {named}, which it keeps; zero_stage: auto would pick ZeRO-{auto.stage}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": dataclasses.asdict(device), "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
            "auto": {"stage": auto.stage, "hpz_ranks": auto.hpz_ranks, "reason": auto.reason},
            "layouts": [{"name": o.name, "stage": o.stage, "hpz_ranks": o.hpz_ranks, "memory_gib": o.memory.as_gib(),
                         "fits": o.fits, "wire_gbytes": o.wire_gbytes, "step_seconds": o.step_seconds,
                         "tokens_per_s_per_gpu": o.tokens_per_s_per_gpu} for o in options]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
