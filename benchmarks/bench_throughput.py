"""Training throughput on one GPU: this stack against Hugging Face transformers, same shape, same run.

Every configuration trains the same model shape (TinyLlama 1.1B by default: seq 2048, bf16) for a
few optimizer steps of ``--accumulation`` micro-batches, one after the other in this one process:

* ``stack-*``: this stack's real path: the recipe -> ``build_engine`` (megatron-core model +
  DeepSpeed) -> the real data loader on an indexed dataset of random tokens -> ``train_step`` of
  train/loop.py (fp32 master weights, fp32 gradient accumulation, clipping, AdamW). Each
  ``stack-*`` configuration is a set of recipe overrides (the speed levers of
  megatron_tinyllama/model/kernels.py, the ZeRO stage, the loader); ``stack-auto`` is the default
  recipe, whose 'auto' levers pick the fastest backends installed here (the log says which).
* ``hf-eager`` / ``hf-compile``: plain ``transformers.LlamaForCausalLM`` of the same shape, SDPA
  attention, fp32 parameters under ``torch.autocast(bfloat16)``, fused AdamW, gradient clipping,
  HF's own loss; ``hf-compile`` wraps the model in ``torch.compile``. Its batches are random
  tokens already on the GPU (no loader).

Printed per run: tokens/s, MFU, peak memory, the first step's loss (the stack configurations start
from the same weights and data, so it must agree across them to bf16 rounding), and ratios to
both HF baselines. MFU uses one FLOP count for all configurations: train/metrics.py's
``flops_per_token`` (6 x non-embedding parameters + 12 x layers x hidden x seq per token, forward
and backward, recomputation not counted) over the device's dense bf16 peak.

A plan entry is ``config@micro_batch``; a configuration that runs out of memory skips its larger
micro-batches. Results are written after every entry (``--out``/results.json), so a run cut short
keeps what it measured. Not a test (tests/unit/test_bench_throughput.py runs it at a tiny shape on
CPU to keep it working). One GPU:

    python benchmarks/bench_throughput.py --out results/            # the default plan, ~6 min on an H100
    python benchmarks/bench_throughput.py --plan hf-compile@8,stack-auto@8,stack-auto@16
    python benchmarks/bench_throughput.py --plan head --out r/ && python benchmarks/bench_throughput.py --plan rest --append --out r/
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

logger = logging.getLogger("bench_throughput")

STACK_CONFIGS: dict[str, list[str]] = {
    # Everything plain: what the stack computed before the levers, under ZeRO-3.
    "stack-plain": ["model.norm_backend=torch", "model.swiglu_backend=torch", "model.rope_backend=torch",
                    "model.cross_entropy_backend=plain", "model.gqa_backend=repeat", "model.torch_compile=none",
                    "parallel.zero_stage=3", "data.num_workers=0", "data.pin_memory=false"],
    "stack-auto": [],
    # One lever back to its plain path at a time (its effect in the fastest configuration).
    "stack-auto-ce-plain": ["model.cross_entropy_backend=plain"],
    "stack-auto-ce-chunked": ["model.cross_entropy_backend=chunked"],
    # liger's cross-entropy (never auto: its own loss is a bf16 sum; the reported loss is recomputed).
    "stack-auto-ce-liger": ["model.cross_entropy_backend=liger"],
    "stack-auto-gqa-repeat": ["model.gqa_backend=repeat"],
    "stack-auto-loader-plain": ["data.num_workers=0", "data.pin_memory=false"],
    # Without torch.compile: the single-op kernels (norm, SwiGLU, RoPE), then without them too.
    "stack-no-compile": ["model.torch_compile=none"],
    "stack-no-compile-no-kernels": ["model.torch_compile=none", "model.norm_backend=torch",
                                    "model.swiglu_backend=torch", "model.rope_backend=torch"],
    # ZeRO stages on one GPU (auto is ZeRO-1 here); under ZeRO-3 auto runs eager layers with the
    # single-op kernels (compiled layers measured slower there: model/kernels.py).
    "stack-zero2": ["parallel.zero_stage=2"],
    "stack-zero3": ["parallel.zero_stage=3"],
    "stack-zero3-compiled": ["parallel.zero_stage=3", "model.torch_compile=layers"],
}
HF_CONFIGS = {"hf-eager": False, "hf-compile": True}

HEAD_PLAN = "hf-compile@8,stack-auto@8"
"""The measurement that matters most: the default recipe against HF + torch.compile, 1.1B, bf16,
micro-batch 8 (benchmarks/gpu_session.sh runs it first, on its own time limit)."""
REST_PLAN = ("hf-eager@8,stack-auto@16,stack-zero3@8,stack-zero3-compiled@8,stack-plain@8,stack-no-compile@8,"
             "stack-auto-gqa-repeat@8,stack-auto-ce-plain@8,stack-auto-loader-plain@8,stack-auto@24,"
             "stack-no-compile-no-kernels@8,stack-auto-ce-liger@8,stack-zero2@8,hf-compile@16,stack-auto@12")
"""The other levers, in priority order."""
DEFAULT_PLAN = f"{HEAD_PLAN},{REST_PLAN}"
"""In priority order: the run stops starting entries when --time-budget-s is spent. ``--plan head``
and ``--plan rest`` name the two parts."""


# ---------------------------------------------------------------------------------------------
# shared


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def allocated_memory_gb() -> float:
    """GPU memory allocated right now (0 on CPU)."""
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def peak_memory_gb() -> float:
    """Peak GPU memory allocated since the last reset; on CPU the process's peak RSS so far."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if torch.cuda.is_available():
        from megatron_tinyllama.train.metrics import _PEAK_TFLOPS

        name = torch.cuda.get_device_name()
        return next((v for k, v in _PEAK_TFLOPS.items() if k in name), None)
    return None


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---------------------------------------------------------------------------------------------
# this stack


def make_dataset(directory: Path, vocab_size: int, num_tokens: int) -> str:
    """An indexed dataset of random tokens in 2048-token documents (the loader packs across them)."""
    import numpy as np

    from megatron_tinyllama.data.indexed import IndexedDatasetWriter, token_dtype

    prefix = str(directory / "random_text_document")
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab_size, num_tokens, dtype=np.int64)
    lengths = np.full(num_tokens // 2048, 2048)
    with IndexedDatasetWriter(prefix, token_dtype(vocab_size)) as writer:
        writer.add_documents(tokens[: lengths.sum()], lengths)
    return prefix


def stack_config(args, name: str, micro_batch: int, data_prefix: str):
    from megatron_tinyllama.config import config_from_dict

    seq = args.seq_length
    tree = {
        "model": {"preset": args.preset, "seq_length": seq},
        "parallel": {"seed": 1234},
        "data": {"blend": [data_prefix], "cache_dir": str(Path(data_prefix).parent / "cache")},
        "optimizer": {"lr": 3e-4, "min_lr": 3e-5, "warmup_tokens": 0},
        "train": {"train_tokens": 10**12, "global_batch_tokens": micro_batch * args.accumulation * seq,
                  "micro_batch_size": micro_batch, "precision": args.precision},
    }
    return config_from_dict(tree, STACK_CONFIGS[name] + list(args.override))


def measure_stack(args, name: str, micro_batch: int, env, data_prefix: str) -> dict:
    from megatron_tinyllama.data.loader import build_train_batches, loader_settings
    from megatron_tinyllama.engine.ds_config import resolve_zero_stage
    from megatron_tinyllama.engine.engine import build_engine
    from megatron_tinyllama.parallel.init import set_seed
    from megatron_tinyllama.train.loop import train_step

    cfg = stack_config(args, name, micro_batch, data_prefix)
    started = time.perf_counter()
    set_seed(cfg.parallel.seed)  # the same initial weights in every configuration
    te = build_engine(cfg, env)
    try:
        steps = args.warmup_steps + args.steps
        batches = build_train_batches(
            cfg.data, seq_length=cfg.model.seq_length, micro_batch_size=micro_batch, dp_rank=0, dp_size=1,
            consumed_samples=0, seed=1, global_batch_size_at=te.geometry.global_batch_size,
            num_samples=(steps + 1) * te.geometry.global_batch_size, vocab_size=cfg.model.vocab_size)
        losses = []
        for _ in range(args.warmup_steps):  # compilation, allocator warm-up, DeepSpeed's first step
            losses.append(train_step(te, cfg, batches, cfg.optimizer.lr).loss)
        warm = time.perf_counter()
        synchronize()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            losses.append(train_step(te, cfg, batches, cfg.optimizer.lr).loss)
        synchronize()
        elapsed = time.perf_counter() - start
        workers, pin = loader_settings(cfg.data)
        return {"seconds": elapsed, "tokens": args.steps * te.geometry.global_batch_size * cfg.model.seq_length,
                "first_loss": losses[0], "losses": losses, "setup_s": warm - started,
                "peak_memory_gb": peak_memory_gb(), "kernels": te.kernels.describe(),
                "zero_stage": resolve_zero_stage(cfg, 1), "loader": f"{workers} workers, pinned={pin}"}
    finally:
        te.engine.destroy()
        del te


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers


def measure_hf(args, compiled: bool, micro_batch: int) -> dict:
    import transformers

    from megatron_tinyllama.checkpoint.hf import hf_config_dict
    from megatron_tinyllama.model.presets import get_preset

    model_cfg = get_preset(args.preset, seq_length=args.seq_length)
    hf_cfg = transformers.LlamaConfig(**hf_config_dict(model_cfg))
    hf_cfg._attn_implementation = "sdpa"
    dev = device()
    started = time.perf_counter()
    torch.manual_seed(1234)
    with dev:  # initialise on the device: a 1.1B model's CPU init takes longer than the run
        model = transformers.LlamaForCausalLM(hf_cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=dev.type == "cuda")
    step_model = torch.compile(model) if compiled else model
    gen = torch.Generator(device=dev).manual_seed(0)
    batches = [torch.randint(0, model_cfg.vocab_size, (micro_batch, model_cfg.seq_length), device=dev,
                             generator=gen) for _ in range(args.accumulation)]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]

    def step() -> float:
        total = 0.0
        for tokens in batches:
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = step_model(input_ids=tokens, labels=tokens).loss / args.accumulation
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)

    try:
        losses = [step() for _ in range(args.warmup_steps)]
        warm = time.perf_counter()
        synchronize()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        losses += [step() for _ in range(args.steps)]
        synchronize()
        elapsed = time.perf_counter() - start
        return {"seconds": elapsed, "tokens": args.steps * args.accumulation * micro_batch * model_cfg.seq_length,
                "first_loss": losses[0], "losses": losses, "setup_s": warm - started,
                "peak_memory_gb": peak_memory_gb(),
                "kernels": {"attention": "sdpa", "compile": "model" if compiled else "none",
                            "precision": f"fp32 params + autocast {args.precision}"}}
    finally:
        del step_model, model, optimizer


# ---------------------------------------------------------------------------------------------
# driver


def parse_plan(plan: str) -> list[tuple[str, int]]:
    plan = {"head": HEAD_PLAN, "rest": REST_PLAN, "default": DEFAULT_PLAN}.get(plan, plan)
    entries = []
    for item in (p.strip() for p in plan.split(",") if p.strip()):
        name, _, micro = item.partition("@")
        if name not in STACK_CONFIGS and name not in HF_CONFIGS:
            raise SystemExit(f"--plan: unknown configuration {name!r}; known: "
                             f"{sorted(STACK_CONFIGS) + sorted(HF_CONFIGS)}")
        entries.append((name, int(micro or 8)))
    return entries


def summarise(results: list[dict], flops_per_token: float, peak: float | None) -> list[str]:
    done = [r for r in results if r.get("tokens_per_s")]

    def best(name: str) -> dict | None:
        runs = [r for r in done if r["config"] == name]
        return max(runs, key=lambda r: r["tokens_per_s"]) if runs else None

    eager, compiled = best("hf-eager"), best("hf-compile")
    same_mb = {r["micro_batch"]: r for r in done if r["config"] == "hf-compile"}
    lines = [f"{'config':30s} {'mb':>3s} {'tokens/s':>10s} {'MFU':>6s} {'peak GB':>8s} {'/HF':>6s} "
             f"{'/HF+c':>6s} {'/HF+c same mb':>13s} {'loss@1':>8s}  backends"]
    for r in results:
        if not r.get("tokens_per_s"):
            lines.append(f"{r['config']:30s} {r['micro_batch']:3d} {r.get('status', '?')}")
            continue
        tps = r["tokens_per_s"]
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "   n/a"
        ratio = lambda base: f"{tps / base['tokens_per_s']:6.2f}" if base else "   n/a"  # noqa: E731
        same = same_mb.get(r["micro_batch"])
        backends = ", ".join(f"{k}={v}" for k, v in r.get("kernels", {}).items())
        if "zero_stage" in r:
            backends += f", ZeRO-{r['zero_stage']}, loader {r['loader']}"
        # The entry's own peak: what earlier entries left allocated is not its cost.
        own_peak = r["peak_memory_gb"] - r.get("memory_before_gb", 0.0)
        lines.append(f"{r['config']:30s} {r['micro_batch']:3d} {tps:10,.0f} {mfu} {own_peak:8.1f} "
                     f"{ratio(eager)} {ratio(compiled)} {ratio(same):>13s} {r['first_loss']:8.4f}  {backends}")
    lines.append(f"MFU = tokens/s x {flops_per_token / 1e9:.3f} GFLOP/token (6 x non-embedding params + "
                 f"12 x layers x hidden x seq; train/metrics.py flops_per_token) / "
                 + (f"{peak:.0f} TFLOP/s peak" if peak else "peak unknown on this device (--peak-tflops)"))
    lines.append("peak GB: " + ("torch.cuda.max_memory_allocated over the timed steps, less what was allocated "
                                "before the entry began" if torch.cuda.is_available()
                                else "peak RSS of this process so far (CPU)"))
    ours = max((r for r in done if r["config"].startswith("stack-")), key=lambda r: r["tokens_per_s"], default=None)
    if ours and compiled:
        ratio = ours["tokens_per_s"] / compiled["tokens_per_s"]
        lines.append(f"goal: best stack ({ours['config']}@{ours['micro_batch']}) / best HF+compile "
                     f"(@{compiled['micro_batch']}) = {ratio:.2f}x (goal >= 1.25x): "
                     + ("MET" if ratio >= 1.25 else "not met"))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default=DEFAULT_PLAN, help="comma-separated config@micro_batch, run in order")
    parser.add_argument("--preset", default="tinyllama-1.1b")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: from its name)")
    parser.add_argument("--time-budget-s", type=float, default=0, help="skip plan entries after this long (0: none)")
    parser.add_argument("--out", help="folder for results.json (default: $OUT, else none)")
    parser.add_argument("--append", action="store_true", help="keep the results already in the folder's "
                        "results.json (an earlier part of the same session) and add this run's after them")
    parser.add_argument("--override", action="append", default=[], help="extra recipe override for every stack run")
    parser.add_argument("--summarise", metavar="RESULTS_JSON", help="only print (and write beside it) the summary "
                        "of an earlier run's results.json, e.g. one stopped by a time limit")
    args = parser.parse_args(argv)
    if args.summarise:
        saved = json.loads(Path(args.summarise).read_text())
        lines = summarise(saved["results"], saved["flops_per_token"], saved["peak_tflops"])
        (Path(args.summarise).parent / "summary.txt").write_text(
            "\n".join([json.dumps({k: v for k, v in saved.items() if k != "results"})] + lines) + "\n")
        print("\n".join(lines))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("DeepSpeed", "deepspeed", "torch._dynamo", "torch._inductor"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out or os.environ.get("OUT", "") or tempfile.mkdtemp(prefix="bench_throughput_"))
    out.mkdir(parents=True, exist_ok=True)
    plan = parse_plan(args.plan)

    from megatron_tinyllama.model.presets import get_preset
    from megatron_tinyllama.parallel.init import initialize_distributed, initialize_model_parallel
    from megatron_tinyllama.train.metrics import flops_per_token

    model_cfg = get_preset(args.preset, seq_length=args.seq_length)
    fpt = flops_per_token(model_cfg)
    peak = peak_tflops(args)
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29591")})
    env = initialize_distributed()
    initialize_model_parallel(1, 1234)
    data_dir = Path(tempfile.mkdtemp(prefix="bench_data_"))
    largest = max(mb for _, mb in plan)
    needed = (args.warmup_steps + args.steps + 2) * largest * args.accumulation * (args.seq_length + 1)
    data_prefix = make_dataset(data_dir, model_cfg.vocab_size, needed + 16 * 2048)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    header = {"device": device_name, "torch": torch.__version__, "preset": args.preset, "seq_length": args.seq_length,
              "precision": args.precision, "accumulation": args.accumulation, "steps": args.steps,
              "warmup_steps": args.warmup_steps, "flops_per_token": fpt, "peak_tflops": peak}
    logger.info("bench: %s", header)
    results: list[dict] = []
    earlier = out / "results.json"
    if args.append and earlier.is_file():
        saved = json.loads(earlier.read_text())
        if {k: saved.get(k) for k in header} != header:
            raise SystemExit(f"--append: {earlier} was measured with {saved.get('device')!r}, "
                             f"{saved.get('preset')!r}, ...; this run differs: {header}")
        results = saved["results"]
        logger.info("appending to %d earlier results in %s", len(results), earlier)
    oom_at: dict[str, int] = {}
    began = time.perf_counter()
    for name, micro_batch in plan:
        record = {"config": name, "micro_batch": micro_batch}
        results.append(record)
        if name in oom_at and micro_batch >= oom_at[name]:
            record["status"] = f"skipped (OOM at micro-batch {oom_at[name]})"
        elif args.time_budget_s and time.perf_counter() - began > args.time_budget_s:
            record["status"] = "skipped (time budget)"
        else:
            logger.info("=== %s @ micro-batch %d", name, micro_batch)
            torch._dynamo.reset()  # each configuration compiles afresh (and never hits dynamo's cache limit)
            reset_memory()
            # What earlier entries of this process left allocated (on the first H200 run, entries
            # after the first few started with tens of GB held: their peaks include it).
            record["memory_before_gb"] = allocated_memory_gb()
            try:
                if name in HF_CONFIGS:
                    measured = measure_hf(args, HF_CONFIGS[name], micro_batch)
                else:
                    measured = measure_stack(args, name, micro_batch, env, data_prefix)
                record.update(measured)
                record["tokens_per_s"] = measured["tokens"] / measured["seconds"]
                record["mfu"] = record["tokens_per_s"] * fpt / (peak * 1e12) if peak else None
                record["status"] = "ok"
                logger.info("%s @ %d: %.0f tokens/s, peak %.1f GB, first loss %.4f", name, micro_batch,
                            record["tokens_per_s"], record["peak_memory_gb"], record["first_loss"])
            except Exception as err:  # noqa: BLE001 - one configuration's failure must not end the run
                if is_oom(err):
                    oom_at[name] = min(micro_batch, oom_at.get(name, micro_batch))
                    record["status"] = "OOM"
                else:
                    record["status"] = f"error: {type(err).__name__}: {err}"[:300]
                    traceback.print_exc()
                logger.warning("%s @ %d: %s", name, micro_batch, record["status"])
            reset_memory()
        (out / "results.json").write_text(json.dumps({**header, "results": results}, indent=1, default=str))
    lines = summarise(results, fpt, peak)
    (out / "summary.txt").write_text("\n".join([json.dumps(header)] + lines) + "\n")
    print("\n".join(lines))
    return 0 if any(r.get("status") == "ok" for r in results) else 1


if __name__ == "__main__":
    from megatron_tinyllama.parallel.cpu_shim import cpu_shim

    with cpu_shim():  # megatron-core's CUDA-only calls get CPU stand-ins (a no-op on a GPU)
        code = main()
    sys.stdout.flush()
    # DeepSpeed/gloo threads sometimes abort at interpreter exit (parallel/init.py exit_process).
    os._exit(code)
