"""``tinyllama-demo``: the README's main job, end to end on one machine.

This module owns the demo's steps and what it shows while they run:

1. Build the demo corpus (Python's documentation prose and standard library, a tokenizer, indexed
   datasets with held-out documents) — :mod:`megatron_tinyllama.data.demo_corpus`.
2. Fill ``examples/demo_cpu.yaml`` with those paths and train through the ``deepspeed`` launcher and
   a hostfile of local ranks (CPU with gloo when there is no GPU). Rank 0's lines are read as they
   come: a progress bar shows step, loss and tokens/s, validation losses and our own log lines are
   printed, known third-party noise is hidden (``--verbose`` shows every line); the launcher's
   whole output is kept in ``<work-dir>/train.node0.log``.
3. Convert the final checkpoint to Hugging Face Llama format, sample from it with
   ``transformers``, and print the validation loss, the wall time, where everything is and what
   to run next.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from megatron_tinyllama.generate import DEFAULT_PROMPTS
from megatron_tinyllama.resources import resource_dir

REPO_EXAMPLES = resource_dir("examples")

log = logging.getLogger("demo")

# Rank 0's metric lines (train/metrics.py), as they arrive from the launcher.
_STEP_LINE = re.compile(r"train\.metrics: step (?P<step>\d+) \| loss (?P<loss>\S+) .*\| "
                        r"(?P<tokens_per_s>[\d,]+) tok/s")
_VALID_LINE = re.compile(r"train\.metrics: step (?P<step>\d+) \| validation loss (?P<loss>\S+)"
                         r"(?: \| forecast final loss (?P<forecast>\S+) \[(?P<low>[^,]+), "
                         r"(?P<high>[^\]]+)\])?")
_RANK_LINE = re.compile(r"^\[rank(?P<rank>\d+)\] [\d:]+ (?P<level>\w+) [\w.]+: (?P<message>.*)$")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (AMX or AVX512-BF16), where bf16 training is faster
    than fp32; elsewhere bf16 is emulated and slower.

    The units only help when torch's kernels may use them: ``ATEN_CPU_CAPABILITY=avx2`` (how a
    machine without them is reproduced on one that has them) caps torch below AVX512.
    """
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def default_local_ranks(cfg) -> tuple[int, str]:
    """(ranks, why) for this machine: one rank per visible GPU, as many as the recipe's batch
    splits over (at most the GPUs); 2 gloo ranks on CPU (data parallelism shown).

    Args:
        cfg: the demo recipe (its batch geometry bounds the data-parallel ranks).
    """
    from megatron_tinyllama.config import ConfigError
    from megatron_tinyllama.engine.ds_config import batch_geometry
    from megatron_tinyllama.parallel.init import visible_gpus

    gpus = visible_gpus()
    if not gpus:
        return 2, "no GPU: 2 CPU ranks with gloo"
    tp = cfg.parallel.tensor_parallel_size

    def splits(ranks: int) -> bool:
        try:
            batch_geometry(cfg, ranks // tp)
        except ConfigError:
            return False
        return ranks % tp == 0

    fitting = [r for r in range(gpus, 0, -1) if splits(r)]
    if not fitting:
        return gpus, f"one per visible GPU ({gpus})"  # the recipe's own error will name the batch
    ranks = fitting[0]
    if ranks == gpus:
        return ranks, f"one per visible GPU ({gpus})"
    return ranks, (f"{ranks} of the {gpus} visible GPUs: train.global_batch_tokens="
                   f"{cfg.train.global_batch_tokens} splits over at most {ranks} ranks of "
                   f"micro-batch {cfg.train.micro_batch_size}")


def write_demo_recipe(template: Path, data_dir: Path, save_dir: Path, out: Path,
                      ranks: int = 2) -> Path:
    """The demo recipe with the corpus paths, the run directory and its world size filled in.

    The world size is declared so that the README's CPU command, run with this recipe but
    without its hostfile, stops at start instead of training on one rank.
    """
    recipe = yaml.safe_load(template.read_text().replace("DEMO/", f"{data_dir}/"))
    recipe.setdefault("parallel", {})["expected_world_size"] = ranks
    recipe.setdefault("checkpoint", {})["save_dir"] = str(save_dir)
    recipe.setdefault("logging", {})["tensorboard_dir"] = str(save_dir / "tb")
    out.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


class TrainingDisplay:
    """Turns the launcher's output lines into a progress bar and a few printed lines.

    Args:
        total_steps: optimizer steps of the run (the bar's length).
        verbose: print every line as it comes (the bar still moves).
    """

    def __init__(self, total_steps: int, verbose: bool = False) -> None:
        from tqdm import tqdm

        from megatron_tinyllama.console import NoiseFilter

        self.verbose = verbose
        self.noise = NoiseFilter()
        self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                   "[{elapsed}<{remaining}{postfix}]")
        self.valid_losses: list[tuple[int, float]] = []
        self.forecast: Optional[str] = None
        """The live check's latest forecast of the final loss, shown beside the loss."""

    def __call__(self, line: str) -> None:
        line = line.rstrip("\n")
        step = _STEP_LINE.search(line)
        if step:
            self.bar.update(int(step["step"]) - self.bar.n)
            forecast = f", forecast end {self.forecast}" if self.forecast else ""
            self.bar.set_postfix_str(f"loss {float(step['loss']):.3f}, "
                                     f"{step['tokens_per_s']} tok/s{forecast}")
        valid = _VALID_LINE.search(line)
        if valid:
            self.valid_losses.append((int(valid["step"]), float(valid["loss"])))
            if valid["forecast"]:
                self.forecast = f"{float(valid['forecast']):.3f}"
        if self.verbose:
            self.bar.write(line)
        elif not step and line.strip() and not self.noise.is_noise(line):
            ours = _RANK_LINE.match(line)
            if ours:
                level = "" if ours["level"] == "INFO" else f"{ours['level']} "
                line = f"  [rank{ours['rank']}] {level}{ours['message']}"
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced (paths absolute)."""

    work_dir: Path
    save_dir: Path
    hf_dir: Path
    recipe: Path
    tokenizer_model: Path
    train_log: Path
    final_valid_loss: Optional[float]
    final_train_loss: Optional[float]
    steps: int
    tokens: int
    samples: tuple[str, ...]
    overrides: tuple[str, ...]
    """Recipe overrides the run used (the user's, plus the fp32 fallback if any)."""
    train_seconds: float
    total_seconds: float
    forecast: Optional[dict] = None
    """:func:`~megatron_tinyllama.scaling.forecast.predict.hindsight_check` of the run (None: not
    made)."""
    forecast_problem: Optional[str] = None
    live: Optional["LiveSummary"] = None
    """The live check's forecasts during the run against the end it reached (None: none made)."""


def _last_metrics(save_dir: Path) -> tuple[Optional[float], Optional[float], int, int]:
    """(validation loss, training loss, step, tokens) of the run's last records (read by the
    scaling tools' one reader of metrics.jsonl)."""
    from megatron_tinyllama.scaling.run_metrics import read_run_metrics

    metrics = read_run_metrics(save_dir / "metrics.jsonl")
    valid = metrics.valid.loss[-1] if len(metrics.valid) else None
    train = metrics.train.loss[-1] if len(metrics.train) else None
    last = [(p.steps[-1], p.tokens[-1]) for p in (metrics.valid, metrics.train) if len(p)]
    step, tokens = max(last) if last else (0, 0)
    return valid, train, step, tokens


def _forecast_check(save_dir: Path) -> tuple[Optional[dict], Optional[str]]:
    """(the forecast of the final loss from the first 70% of the run against its measured end,
    None) or (None, why it could not be made): a forecast must never fail the demo."""
    from megatron_tinyllama.scaling.fit import ScalingError
    from megatron_tinyllama.scaling.forecast.predict import hindsight_check

    try:
        return hindsight_check(save_dir, 0.7, replicates=50), None
    except ScalingError as err:
        return None, str(err)


def run_demo(work_dir: Path, *, ranks: Optional[int] = None, overrides: Sequence[str] = (),
             prompts: Sequence[str] = DEFAULT_PROMPTS, verbose: bool = False) -> DemoResult:
    """Build the corpus, train through the launcher, convert and sample (see the module docstring).

    Args:
        ranks: local ranks; None picks them from the machine (:func:`default_local_ranks`).

    Raises:
        subprocess.CalledProcessError: training failed (its log is in ``work_dir``).
        ConfigError: the recipe with ``overrides`` is invalid, or ``ranks`` is more than the
            visible GPUs (before anything is launched).
    """
    from megatron_tinyllama.config import ConfigError
    from megatron_tinyllama.parallel.init import visible_gpus

    if ranks is not None and torch.cuda.is_available() and ranks > visible_gpus():
        raise ConfigError(f"--ranks {ranks} is more than the {visible_gpus()} visible GPU"
                          f"{'s' if visible_gpus() != 1 else ''}: one rank per GPU")
    from megatron_tinyllama.checkpoint.convert import convert_to_hf
    from megatron_tinyllama.config import load_config
    from megatron_tinyllama.data.demo_corpus import build_demo_corpus
    from megatron_tinyllama.generate import (SamplingConfig, generate, load_hf_model,
                                             load_tokenizer_for)
    from megatron_tinyllama.launch import launch_local

    start = time.time()
    work_dir = work_dir.resolve()
    data_dir, save_dir, hf_dir = work_dir / "data", work_dir / "run", work_dir / "hf"
    work_dir.mkdir(parents=True, exist_ok=True)
    recipe = write_demo_recipe(REPO_EXAMPLES / "demo_cpu.yaml", data_dir, save_dir,
                               work_dir / "recipe.yaml", ranks=ranks or 2)
    cfg = load_config(recipe, list(overrides))
    if ranks is None:
        ranks, why = default_local_ranks(cfg)
        log.info("%d local rank%s: %s (--ranks to choose)", ranks, "s" if ranks > 1 else "", why)
        recipe = write_demo_recipe(REPO_EXAMPLES / "demo_cpu.yaml", data_dir, save_dir,
                                   work_dir / "recipe.yaml", ranks=ranks)
        cfg = load_config(recipe, list(overrides))
    if cfg.train.precision == "bf16" and not torch.cuda.is_available() and not cpu_has_fast_bf16():
        log.info("this CPU has no bf16 matrix units (AMX, AVX512-BF16): training in fp32")
        overrides = [*overrides, "train.precision=fp32"]
        cfg = load_config(recipe, list(overrides))
    vocab_size = cfg.model.vocab_size
    if (data_dir / "tokenizer.model").is_file():
        from megatron_tinyllama.data.tokenizer import load_tokenizer

        if load_tokenizer(data_dir / "tokenizer.model").vocab_size != vocab_size:
            shutil.rmtree(data_dir)  # built for another model.vocab_size: the ids would not fit
    log.info("1/3 corpus: Python's documentation + standard library, tokenizer of %d pieces -> %s",
             vocab_size, _show(data_dir))
    corpus = build_demo_corpus(data_dir, vocab_size=vocab_size, progress=True)
    if save_dir.exists():  # a demo run starts fresh; resuming is for real runs
        shutil.rmtree(save_dir)
    steps = math.ceil((cfg.train.train_tokens - cfg.train.start_tokens)
                      / cfg.train.global_batch_tokens)
    log.info("2/3 training: deepspeed launcher, %d local ranks, %d steps of %d tokens, %s; "
             "full log: %s", ranks, steps, cfg.train.global_batch_tokens, cfg.train.precision,
             _show(work_dir / "train.node0.log"))
    display = TrainingDisplay(steps, verbose=verbose)
    train_start = time.time()
    try:
        launch_local(recipe, nodes=1, ranks_per_node=ranks, work_dir=work_dir,
                     overrides=overrides, log_path=work_dir / "train.log", on_line=display)
    finally:
        display.close()
    train_seconds = time.time() - train_start
    valid_loss, train_loss, last_step, tokens = _last_metrics(save_dir)
    forecast, forecast_problem = _forecast_check(save_dir)
    live = _live_summary(save_dir)
    log.info("3/3 converting to Hugging Face format -> %s; sampling with transformers",
             _show(hf_dir))
    convert_to_hf(save_dir, hf_dir, tokenizer_model=corpus.tokenizer_model, overwrite=True)
    import transformers

    if not verbose:
        transformers.utils.logging.disable_progress_bar()
    samples = tuple(generate(load_hf_model(hf_dir), load_tokenizer_for(hf_dir), prompts,
                             SamplingConfig()))
    return DemoResult(work_dir=work_dir, save_dir=save_dir, hf_dir=hf_dir, recipe=recipe,
                      tokenizer_model=corpus.tokenizer_model,
                      train_log=work_dir / "train.node0.log", final_valid_loss=valid_loss,
                      final_train_loss=train_loss, steps=last_step, tokens=tokens,
                      samples=samples, overrides=tuple(overrides), train_seconds=train_seconds,
                      total_seconds=time.time() - start, forecast=forecast,
                      forecast_problem=forecast_problem, live=live)


def _live_summary(save_dir: Path):
    """The live check's record of the run (None when it made no forecast or cannot be read)."""
    from megatron_tinyllama.train.forecast_live import summarize_live_checks

    try:
        return summarize_live_checks(save_dir / "metrics.jsonl")
    except Exception:  # noqa: BLE001 - a summary line must never fail the demo
        return None


def live_line(live) -> str:
    """The summary's line on the live check: how its forecasts during the run fared."""
    if live is None:
        return "live forecast check: none made (too few validation points past the burn-in)"
    caveated = f", {live.caveated} with caveats" if live.caveated else ""
    return (f"live forecast check: {live.checks} forecasts of the final loss from step {live.first_step} "
            f"on; the measured end {live.measured_end:.3f} inside their 95% band in {live.inside} of "
            f"{live.checks}; first {100 * live.first_error:+.1f}%, last {100 * live.last_error:+.1f}%"
            f"{caveated}; {live.warnings} warning{'s' if live.warnings != 1 else ''}")


def _show(path: Path) -> str:
    """``path`` relative to the current directory when it lies below it (shorter to copy)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def forecast_line(check: Optional[dict], problem: Optional[str] = None) -> str:
    """The summary's line on the loss-curve forecast: made from the first 70% of the run, how far
    it was off the measured end, on which loss, and its caveats."""
    if check is None:
        return f"loss-curve forecast: not made ({problem})"
    kind = ("validation loss" if check["loss_kind"] == "valid_loss" else
            "training loss: too few validation points; see tinyllama-scaling forecast")
    caveats = f"; caveats: {', '.join(check['caveat_keys'])}" if check["caveat_keys"] else ""
    return (f"loss-curve forecast from the first {check['fit_until_step']} steps ({kind}): "
            f"final loss {check['final_loss']:.3f} [{check['band'][0]:.3f}, "
            f"{check['band'][1]:.3f}], measured {check['measured_end']:.3f} at step "
            f"{check['measured_end_step']}: {100 * check['error']:+.1f}%{caveats}")


def report(result: DemoResult) -> str:
    """The closing text: losses, time, samples, outputs and the next commands."""
    from megatron_tinyllama.launch import deepspeed_command, launcher_env

    latest = (result.save_dir / "latest").read_text().strip()
    valid = "n/a" if result.final_valid_loss is None else f"{result.final_valid_loss:.3f}"
    train = "n/a" if result.final_train_loss is None else f"{result.final_train_loss:.3f}"
    lines = [
        f"done in {result.total_seconds:.0f} s (training {result.train_seconds:.0f} s): "
        f"validation loss {valid} on held-out documents (training loss {train}) after "
        f"{result.steps} steps, {result.tokens:,} tokens",
        forecast_line(result.forecast, result.forecast_problem),
        live_line(result.live),
        "",
    ]
    for sample in result.samples:
        lines += [sample.rstrip(), "-" * 60]
    command = deepspeed_command(Path(_show(result.work_dir / "hostfile")), 0, 29500,
                                Path(_show(result.recipe)), result.overrides, check_port=False)
    command[0] = "deepspeed"
    accelerator = "DS_ACCELERATOR=cpu " if launcher_env().get("DS_ACCELERATOR") == "cpu" else ""
    tokenizer = _show(result.tokenizer_model)
    lines += [
        "",
        f"outputs in {_show(result.work_dir)}/:",
        f"  data/     corpus jsonl, tokenizer ({tokenizer}), indexed datasets",
        f"  run/      checkpoints (latest {latest}), config.yaml, metrics.jsonl, tb/",
        "  hf/       Hugging Face Llama export (AutoModelForCausalLM.from_pretrained)",
        "  train.node0.log  everything the launcher and the ranks printed",
        "next:",
        f"  tensorboard --logdir {_show(result.save_dir / 'tb')}",
        f"  tinyllama-generate {_show(result.save_dir)} --prompt 'class Stack:'",
        f"  tinyllama-convert-to-hf --input {_show(result.save_dir)} --output "
        f"{_show(result.hf_dir)} --tokenizer-model {tokenizer} --overwrite",
        "  # resume (the same command continues from run/latest; a larger train.train_tokens "
        "trains on):",
        f"  {accelerator}{shlex.join(command)} train.train_tokens={2 * result.tokens}",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tinyllama-demo",
        description="Build data, train a small TinyLlama through the deepspeed launcher, convert, "
                    "sample.")
    parser.add_argument("--work-dir", default="runs/demo", type=Path)
    parser.add_argument("--ranks", type=int, default=None,
                        help="local ranks for the deepspeed launcher (default: one per visible "
                             "GPU; 2 on CPU)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="repeatable (default: one prose and one code prompt)")
    parser.add_argument("--verbose", action="store_true",
                        help="show every line the launcher and the ranks print, known "
                             "third-party noise included (also: TINYLLAMA_VERBOSE=1)")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE",
                        help="recipe overrides, e.g. train.train_tokens=500000")
    args = parser.parse_args(argv)
    from megatron_tinyllama.console import VERBOSE_ENV, hide_known_noise, verbose

    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # the ranks inherit it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    hide_known_noise()
    import subprocess

    from megatron_tinyllama.config import ConfigError

    try:
        result = run_demo(args.work_dir, ranks=args.ranks, overrides=args.overrides,
                          prompts=args.prompt or DEFAULT_PROMPTS, verbose=verbose())
    except ConfigError as err:
        print(f"tinyllama-demo: error: {err}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:
        print(f"tinyllama-demo: training failed (exit {err.returncode}); full log: "
              f"{_show(args.work_dir / 'train.node0.log')}", file=sys.stderr)
        return 1
    print("\n" + report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
