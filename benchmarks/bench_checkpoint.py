"""Cost of a training checkpoint on CPU: DeepSpeed's plain save against ours, and the resharding load.

Spawns ``--ranks`` gloo processes (one simulated node, TP 1, ZeRO-3 or ``--save-zero-stage``, fp32 or ``--precision bf16``) that build the engine
for the TinyLlama 1.1B width (hidden 2048, FFN 5632, 32 heads in 4 KV groups, vocabulary 32000)
with ``--layers`` layers (22 is the full 1.1B; fewer when the memory does not hold it). AdamW's
state is created (zeros: the bytes and the time do not depend on the values), then each rank times:

* ``ds_save``: DeepSpeed's ``engine.save_checkpoint`` alone (what a plain DeepSpeed run writes),
* ``ds_load``: DeepSpeed's ``engine.load_checkpoint`` of it on the same layout,
* ``ours_save``: what the training loop waits for, checkpoint.saving.CheckpointSaver.save in the
  background (the copy of the rank's state to host memory), ``ours_save_complete``: until that
  save is durable (every rank's file written and synced, the manifest, ``latest``), and
  ``ours_staging_bytes``: the host memory each rank's background save holds (one value per rank),
* ``ours_sync_save``: the same save written before training goes on (``checkpoint.background_save:
  false``: no staging copy),

and a second set of processes at the save's layout times ``ours_load`` (the start plan's load of
our checkpoint: the rank's own ranges), and a third, at ZeRO-1 (another layout;
``--load-zero-stage``, ``--load-tp``), ``reshard_load``.
For each of these, every rank's anonymous resident memory (RssAnon: tensors, not the page cache)
is recorded before it and at its peak (sampled every 5 ms), as ``<name>_rss_before`` and
``<name>_rss_peak``, one value per rank. Bytes are counted per part of the checkpoint directory.
The numbers go to ``--out`` (JSON) and are printed. Not a test; run once:

    python benchmarks/bench_checkpoint.py --ranks 2 --layers 4 --out results/checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported


def _tree(save_dir: Path, ranks: int, layers: int, zero_stage: int, preset: str, precision: str,
          tp: int = 1) -> dict:
    seq = 256
    return {
        "model": {"preset": preset, "num_layers": layers, "seq_length": seq},
        "parallel": {"tensor_parallel_size": tp, "zero_stage": zero_stage, "hpz_partition_size": 1},
        "train": {"train_tokens": 10 * seq * ranks, "global_batch_tokens": seq * ranks, "micro_batch_size": 1,
                  "precision": precision},
        "checkpoint": {"save_dir": str(save_dir), "keep_last": 0},
    }


def _rss_anon() -> int:
    """This process's anonymous resident memory in bytes (heap: tensors; not the page cache of
    files it has mapped, which the kernel reclaims)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class _PeakRss:
    """Samples RssAnon every few milliseconds on a thread; ``peak`` is the largest seen."""

    def __init__(self) -> None:
        self.peak, self._stop = _rss_anon(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_anon())

    def __enter__(self) -> "_PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())


def _timed(fn, results: dict, name: str) -> None:
    """Time ``fn`` between barriers into ``results[name]``, and this rank's anonymous memory before
    it and at its peak into ``results[name + "_rss_before"]`` / ``[name + "_rss_peak"]``."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    before = _rss_anon()
    with _PeakRss() as rss:
        start = time.perf_counter()
        fn()
        dist.barrier()
        results[name] = time.perf_counter() - start
    results[f"{name}_rss_before"], results[f"{name}_rss_peak"] = before, rss.peak


def _rank_main(rank: int, ranks: int, port: int, save_dir: str, layers: int, preset: str, phase: str,
               out: str, load_stage: int, ds_load: bool, precision: str, load_tp: int, save_stage: int,
               background: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(ranks),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(ranks))
    import torch
    import torch.distributed as dist

    from megatron_tinyllama.checkpoint import reshard, saving, training
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.engine.engine import build_engine
    from megatron_tinyllama.parallel.cpu_shim import cpu_shim
    from megatron_tinyllama.parallel.init import initialize_distributed, initialize_model_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    results: dict = {}
    with cpu_shim():
        env = initialize_distributed()  # DeepSpeed's comm adopts the gloo group
        other = phase == "load"  # on another layout; "save" and "same-layout load" at the save's
        cfg = config_from_dict(_tree(Path(save_dir), ranks, layers, load_stage if other else save_stage, preset,
                                      precision, load_tp if other else 1))
        initialize_model_parallel(cfg.parallel.tensor_parallel_size, 7)
        te = build_engine(cfg, env)
        if phase == "save":
            results["parameters"] = sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel())
                                        for p in te.model.parameters())
            reshard.prepare_adam_state(te.engine, 1)
            state = training.TrainerState(step=1, consumed_samples=ranks, consumed_tokens=256 * ranks)
            plain = Path(save_dir) / "plain"
            _timed(lambda: te.engine.save_checkpoint(str(plain), tag="global_step000001"), results, "ds_save")
            # DeepSpeed's save returns before its bytes are on the disk; ours syncs each file
            # (latest moves only when every rank's part is durable). The same, made durable:
            _timed(lambda: (te.engine.save_checkpoint(str(plain), tag="global_step000001"), os.sync()),
                   results, "ds_save_durable")
            if ds_load:  # DeepSpeed reads each rank's whole file into memory first (12P/N bytes)
                _timed(lambda: te.engine.load_checkpoint(str(plain), tag="global_step000001"), results, "ds_load")
            import logging

            class _Breakdown(logging.Handler):  # the save's own line: where its time went
                def emit(self, record):
                    if record.getMessage().startswith("saved checkpoint"):
                        results["ours_save_breakdown"] = record.getMessage().partition(": ")[2] or "-"

            logging.getLogger(saving.__name__).addHandler(_Breakdown())
            logging.getLogger(saving.__name__).setLevel(logging.INFO)
            import dataclasses

            saver = saving.CheckpointSaver(background=background)
            # The first save of a run maps its staging memory; the ones after copy into it. Two
            # saves: the first's numbers as ours_first_*, the second's (what a long run pays at
            # every save) as ours_*. Each waits for its write before the next is timed.
            for name, step in (("ours_first", 1), ("ours", 2)):
                began = time.perf_counter()
                this = dataclasses.replace(state, step=step)
                _timed(lambda: saver.save(te.engine, cfg, this), results, f"{name}_save")
                results[f"{name}_staging_seconds"] = saver.last_staging_seconds
                _timed(saver.wait, results, f"{name}_wait")
                results[f"{name}_save_complete"] = time.perf_counter() - began
            results["ours_staging_bytes"] = saver.last_staging_bytes
            saver.close()
            if background:  # the same save written before training goes on, for comparison
                sync = config_from_dict(_tree(Path(save_dir) / "sync", ranks, layers, save_stage, preset, precision))
                _timed(lambda: saving.save_training_checkpoint(te.engine, sync, state), results, "ours_sync_save")
        else:
            plan = training.plan_start(cfg, ranks)
            name = "ours_load" if phase == "same-layout load" else "reshard_load"
            if os.environ.get("BENCH_PROFILE"):  # where a load's time goes, per rank
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            _timed(lambda: training.start_state(te.engine, cfg, plan), results, name)
            if os.environ.get("BENCH_PROFILE"):
                profiler.disable()
                profiler.dump_stats(f"{os.environ['BENCH_PROFILE']}.{name}.rank{rank}")
    everyone = [None] * ranks
    dist.all_gather_object(everyone, results)
    if rank == 0:  # times are the same on every rank (barriers); memory is per rank
        per_rank = [k for k in everyone[0] if "_rss_" in k or k == "ours_staging_bytes"]
        merged = {k: v for k, v in everyone[0].items() if k not in per_rank}
        merged.update({k: [r[k] for r in everyone] for k in per_rank})
        Path(out).write_text(json.dumps(merged))
    dist.barrier()
    dist.destroy_process_group()


def _bytes(root: Path) -> dict[str, int]:
    tag = root / "global_step000002"
    parts = {"ours_total": tag, "ds_plain_total": root / "plain" / "global_step000001"}
    return {name: sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) for name, path in parts.items()}


def main(argv=None) -> int:
    import torch.multiprocessing as mp

    from megatron_tinyllama.launch import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=22, help="22 = TinyLlama 1.1B")
    parser.add_argument("--preset", default="tinyllama-1.1b", help="tinyllama-debug for a smoke run")
    parser.add_argument("--save-zero-stage", type=int, default=3, help="the ZeRO stage of the saves")
    parser.add_argument("--load-zero-stage", type=int, default=1,
                        help="the ZeRO stage of the resharding load (another than --save-zero-stage); "
                             "a load at ZeRO-3 and the TP degree of the save reads each rank's 1/N only")
    parser.add_argument("--load-tp", type=int, default=1,
                        help="the TP degree of the resharding load (the save is at TP 1)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="bf16 holds 2 bytes less per parameter (what TinyLlama trains in); the "
                             "checkpoint is the same (fp32 master weights and moments)")
    parser.add_argument("--ds-load", action=argparse.BooleanOptionalAction, default=True,
                        help="time DeepSpeed's load_checkpoint (--no-ds-load where its extra 12P/N bytes "
                             "per rank do not fit)")
    parser.add_argument("--background", action=argparse.BooleanOptionalAction, default=True,
                        help="ours_save in the background (the default); --no-background where the "
                             "staging copy (12P/N bytes per rank) does not fit beside the engine: "
                             "ours_* are then synchronous saves")
    parser.add_argument("--dir", help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--out", default="checkpoint_bench.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = {"background": args.background, "ranks": args.ranks, "layers": args.layers, "preset": args.preset,
                   "save_zero_stage": args.save_zero_stage, "load_zero_stage": args.load_zero_stage, "load_tp": args.load_tp, "precision": args.precision}
        for phase in ("save", "same-layout load", "load"):
            out = Path(tmp) / f"{phase.replace(' ', '-')}.json"
            mp.spawn(_rank_main, args=(args.ranks, free_port(), tmp, args.layers, args.preset, phase, str(out),
                                                   args.load_zero_stage, args.ds_load, args.precision,
                                                   args.load_tp, args.save_zero_stage, args.background),
                     nprocs=args.ranks, join=True)
            results.update(json.loads(out.read_text()))
            if phase == "save":  # counted; then only the checkpoint the load reads is kept (disk)
                results.update(_bytes(Path(tmp)))
                shutil.rmtree(Path(tmp) / "plain")
                shutil.rmtree(Path(tmp) / "sync", ignore_errors=True)
                results["ours_total_over_ds_plain"] = results["ours_total"] / results["ds_plain_total"]
                results["ours_save_over_ds_save"] = results["ours_save"] / results["ds_save"]
                results["ours_save_complete_over_ds_save"] = results["ours_save_complete"] / results["ds_save"]
                results["ours_save_complete_over_ds_save_durable"] = (results["ours_save_complete"]
                                                                      / results["ds_save_durable"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    for key, value in results.items():
        if isinstance(value, list):  # per rank, bytes of memory
            shown = ", ".join(f"{v / 2**30:.2f}" for v in value) + " GiB (per rank)"
        elif key.startswith(("ours_", "ds_plain")) and isinstance(value, int):
            shown = f"{value / 2**30:.2f} GiB"
        else:
            shown = f"{value:.2f} s" if isinstance(value, float) else value
        print(f"{key:28s} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
