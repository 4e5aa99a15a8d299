"""Cost of a training checkpoint on CPU: DeepSpeed's plain save against ours, and the resharding load.

Spawns ``--ranks`` gloo processes (one simulated node, TP 1, ZeRO-3, fp32) that build the engine
for the TinyLlama 1.1B width (hidden 2048, FFN 5632, 32 heads in 4 KV groups, vocabulary 32000)
with ``--layers`` layers (22 is the full 1.1B; fewer when the memory does not hold it). AdamW's
state is created (zeros: the bytes and the time do not depend on the values), then each rank times:

* ``ds_save``: DeepSpeed's ``engine.save_checkpoint`` alone (what a plain DeepSpeed run writes),
* ``ds_load``: DeepSpeed's ``engine.load_checkpoint`` of it on the same layout (our fast path),
* ``ours_save``: checkpoint.training.save_training_checkpoint (DeepSpeed's files + RNG + the model
  export + the layout-free AdamW moments + the manifest), and ``optim_save``: the layout-free
  moments alone (checkpoint.reshard.save_optimizer_state),

and a second set of processes, at ZeRO-1 (another layout), times ``reshard_load``: the start plan's
load of that checkpoint (checkpoint.reshard.load_resharded). Bytes are counted per part of the
checkpoint directory. The numbers go to ``--out`` (JSON) and are printed. Not a test; run once:

    python benchmarks/bench_checkpoint.py --ranks 2 --layers 4 --out results/checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported


def _tree(save_dir: Path, ranks: int, layers: int, zero_stage: int, preset: str) -> dict:
    seq = 256
    return {
        "model": {"preset": preset, "num_layers": layers, "seq_length": seq},
        "parallel": {"tensor_parallel_size": 1, "zero_stage": zero_stage, "hpz_partition_size": 1},
        "train": {"train_tokens": 10 * seq * ranks, "global_batch_tokens": seq * ranks, "micro_batch_size": 1,
                  "precision": "fp32"},
        "checkpoint": {"save_dir": str(save_dir), "keep_last": 0},
    }


def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _rank_main(rank: int, ranks: int, port: int, save_dir: str, layers: int, preset: str, phase: str,
               out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(ranks),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(ranks))
    import torch
    import torch.distributed as dist

    from megatron_tinyllama.checkpoint import reshard, training
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.engine.engine import build_engine
    from megatron_tinyllama.parallel.cpu_shim import cpu_shim
    from megatron_tinyllama.parallel.init import initialize_distributed, initialize_model_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    results: dict = {}
    with cpu_shim():
        env = initialize_distributed()  # DeepSpeed's comm adopts the gloo group
        cfg = config_from_dict(_tree(Path(save_dir), ranks, layers, 3 if phase == "save" else 1, preset))
        initialize_model_parallel(1, 7)
        te = build_engine(cfg, env)
        results["parameters"] = sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel())
                                    for p in te.model.parameters())
        if phase == "save":
            reshard.prepare_adam_state(te.engine, 1)
            state = training.TrainerState(step=1, consumed_samples=ranks, consumed_tokens=256 * ranks)
            plain = Path(save_dir) / "plain"
            results["ds_save"] = _timed(lambda: te.engine.save_checkpoint(str(plain), tag="global_step000001"))
            results["ds_load"] = _timed(lambda: te.engine.load_checkpoint(str(plain), tag="global_step000001"))
            results["optim_save"] = _timed(lambda: reshard.save_optimizer_state(te.engine, Path(save_dir) / "optim_only"))
            results["ours_save"] = _timed(lambda: training.save_training_checkpoint(te.engine, cfg, state))
        else:
            plan = training.plan_start(cfg, ranks)
            results["reshard_load"] = _timed(lambda: training.start_state(te.engine, cfg, plan))
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _bytes(root: Path) -> dict[str, int]:
    tag = root / "global_step000001"
    parts = {"ours_total": tag, "ours_model_export": tag / "model", "ours_layout_free_moments": tag / "optim",
             "ds_plain_total": root / "plain" / "global_step000001"}
    return {name: sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) for name, path in parts.items()}


def main(argv=None) -> int:
    import torch.multiprocessing as mp

    from megatron_tinyllama.launch import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=22, help="22 = TinyLlama 1.1B")
    parser.add_argument("--preset", default="tinyllama-1.1b", help="tinyllama-debug for a smoke run")
    parser.add_argument("--dir", help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--out", default="checkpoint_bench.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = {"ranks": args.ranks, "layers": args.layers, "preset": args.preset}
        for phase in ("save", "load"):
            out = Path(tmp) / f"{phase}.json"
            mp.spawn(_rank_main, args=(args.ranks, free_port(), tmp, args.layers, args.preset, phase, str(out)),
                     nprocs=args.ranks, join=True)
            results.update(json.loads(out.read_text()))
        results.update(_bytes(Path(tmp)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    for key, value in results.items():
        shown = f"{value / 2**30:.2f} GiB" if key.startswith(("ours_", "ds_plain")) and isinstance(value, int) \
            else (f"{value:.2f} s" if isinstance(value, float) else value)
        print(f"{key:28s} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
