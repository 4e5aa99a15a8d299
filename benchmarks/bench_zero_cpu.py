"""ZeRO-3 against ZeRO-1 on CPU at 2 gloo ranks: tokens/s side by side, alternating, one machine.

Issue 29 item 3 asks ZeRO-3 >= 0.95 x ZeRO-1 at 2 ranks for the demo's shape and for
``tinyllama-small``. This trains each stage through the real loop (train/loop.py ``train`` ->
``build_engine`` -> ``train_step``) on synthetic batches for ``--warmup`` + ``--steps`` steps, on 2
ranks started as the tests start them, and times every step on rank 0 (wall clock; the first
``--warmup`` steps are left out: DeepSpeed's ZeRO-3 traces its first steps). The stages alternate
for ``--rounds`` rounds (1, 3, 1, 3, ...) so that a change in the machine's load falls on both;
the ratio is the median of each round's ZeRO-3 / ZeRO-1. Not a test. Shapes:

    python benchmarks/bench_zero_cpu.py --shape demo --out benchmarks/results/zero_stages_cpu_demo.json
    python benchmarks/bench_zero_cpu.py --shape small --out benchmarks/results/zero_stages_cpu_small.json

``--shape demo``: examples/demo_cpu.yaml's model and batch (tinyllama-small at vocabulary 2048,
bf16, 2048-token batches of micro-batch 4: one micro-batch per rank per step); ``small``: the
preset as it is, fp32, 4 micro-batches per rank per step (gradient accumulation, where ZeRO-3
reduce-scatters after every micro-batch). ``--override`` adds recipe overrides to both stages
(``--override-3`` to ZeRO-3 alone: what is being tried).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

SHAPES = {
    "demo": {"model": {"preset": "tinyllama-small", "vocab_size": 2048},
             "train": {"global_batch_tokens": 2048, "micro_batch_size": 4, "precision": "bf16"}},
    "small": {"model": {"preset": "tinyllama-small"},
              "train": {"global_batch_tokens": 8 * 2 * 256, "micro_batch_size": 1, "precision": "fp32"}},
}


def _tree(shape: str, stage: int, steps: int) -> dict:
    base = json.loads(json.dumps(SHAPES[shape]))
    tokens = base["train"]["global_batch_tokens"]
    tree = {
        "model": base["model"],
        "parallel": {"tensor_parallel_size": 1, "zero_stage": stage, "seed": 1234},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_tokens": tokens},
        "train": {**base["train"], "train_tokens": steps * tokens},
        "logging": {"log_interval_steps": 1000000, "forecast": False},
    }
    return tree


def _worker(rank, world_size, tree, overrides, out):
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.train import loop
    from tests.distributed.synthetic import synthetic_batches

    times = []
    original = loop.train_step

    profile_dir = os.environ.get("BENCH_PROFILE")  # a folder: rank 0's cProfile of the timed steps
    profiler = None
    if profile_dir and rank == 0:
        import cProfile

        profiler = cProfile.Profile()

    def timed(*args, **kwargs):
        if profiler is not None and len(times) == 6:
            profiler.enable()
        began = time.perf_counter()
        result = original(*args, **kwargs)
        times.append(time.perf_counter() - began)
        return result

    loop.train_step = timed
    loop.train(config_from_dict(tree, overrides), batch_source=synthetic_batches)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(Path(profile_dir) / f"zero{tree['parallel']['zero_stage']}.prof"))


def main(argv=None) -> int:
    from tests.distributed.ranks import run_on_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stages", default="1,3")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--override-3", action="append", default=[], dest="override3")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    stages = [int(s) for s in args.stages.split(",")]
    runs: dict[int, list[dict]] = {s: [] for s in stages}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for stage in stages:
                overrides = args.override + (args.override3 if stage == 3 else [])
                tree = _tree(args.shape, stage, args.warmup + args.steps)
                out = Path(tmp) / f"{round_}-{stage}.json"
                run_on_ranks(_worker, 2, tree, overrides, str(out))
                timed = json.loads(out.read_text())[args.warmup:]
                tokens = tree["train"]["global_batch_tokens"]
                runs[stage].append({"round": round_, "step_s_median": statistics.median(timed),
                                    "tokens_per_s": tokens * len(timed) / sum(timed)})
                print(f"round {round_} ZeRO-{stage}: {runs[stage][-1]['tokens_per_s']:.0f} tokens/s "
                      f"(median step {1000 * runs[stage][-1]['step_s_median']:.1f} ms)", flush=True)
    result = {"shape": args.shape, "ranks": 2, "steps": args.steps, "warmup": args.warmup,
              "overrides": args.override, "overrides_zero3": args.override3, "runs": runs,
              "cpu": _cpu_name(), "load_average": os.getloadavg()}
    if 1 in runs and 3 in runs:
        ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs[1], runs[3])]
        result["zero3_over_zero1_per_round"] = ratios
        result["zero3_over_zero1"] = statistics.median(ratios)
        print(f"ZeRO-3 / ZeRO-1 tokens/s: {result['zero3_over_zero1']:.3f} "
              f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
