"""``tinyllama-pipeline``: a multi-stage recipe (TinyLlama v1.1) as one command.

This module owns running the stages of a variant in order, each through the ``deepspeed``
launcher, each continuing the previous stage's run (``checkpoint.continue_from`` = the previous
stage's save_dir: weights, fp32 master weights, optimizer state, token count and data position),
and converting the last stage to a Hugging Face model. A stage whose save_dir already holds a
checkpoint at its ``train.train_tokens`` is skipped, so the same command resumes a pipeline that
stopped anywhere (a stage that stopped midway resumes from its own checkpoints).

Stage files in the recipe folder: ``stage1_*.yaml`` (``stage1_basic.yaml`` is shared by the
variants), then ``stage2_<variant>.yaml``, ``stage3_<variant>.yaml``, ... Each declares
``stage.number``/``stage.count``, which are checked against the file order.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_tinyllama.config import ConfigError, JobConfig, load_config
from megatron_tinyllama.resources import resource_dir

logger = logging.getLogger(__name__)

REPO_V1_1 = resource_dir("examples") / "tinyllama_v1_1"

Launcher = Callable[[Path, list[str]], None]
"""Runs one stage: (recipe, overrides) -> returns when the launcher has finished."""


def stage_recipes(recipes_dir: Path, variant: str) -> list[Path]:
    """The stage files of ``variant`` in order (stage 1 may be shared by all variants).

    Raises:
        ConfigError: a stage file is missing or two match.
    """
    recipes_dir = Path(recipes_dir)
    files = []
    number = 1
    while True:
        own = recipes_dir / f"stage{number}_{variant}.yaml"
        shared = sorted(recipes_dir.glob(f"stage{number}_*.yaml"))
        if own.is_file():
            files.append(own)
        elif len(shared) == 1 and number == 1:
            files.append(shared[0])
        elif shared and number == 1:
            raise ConfigError(f"{recipes_dir}: several stage-1 recipes {[p.name for p in shared]} "
                              f"and no stage1_{variant}.yaml")
        else:
            break
        number += 1
    if len(files) < 2:
        variants = sorted({p.stem.split("_", 1)[1] for p in recipes_dir.glob("stage2_*.yaml")})
        raise ConfigError(f"{recipes_dir}: no stage recipes for variant {variant!r}; variants here: "
                          f"{variants}")
    return files


def stage_finished(cfg: JobConfig) -> bool:
    """True when the stage's save_dir holds a complete checkpoint at its train_tokens."""
    from megatron_tinyllama.checkpoint.training import read_trainer_state, resume_candidates

    if not cfg.checkpoint.save_dir or not Path(cfg.checkpoint.save_dir).is_dir():
        return False
    candidates = resume_candidates(Path(cfg.checkpoint.save_dir))
    state = read_trainer_state(candidates[0]) if candidates else None
    return bool(state) and state["consumed_tokens"] >= cfg.train.train_tokens


def plan_pipeline(files: Sequence[Path], overrides: Sequence[str] = (),
                  run_dir: Optional[Path] = None) -> list[tuple[Path, list[str], JobConfig]]:
    """Each stage's recipe, its overrides (the chain made explicit) and resolved config.

    Raises:
        ConfigError: a recipe that does not load, or stage numbers that contradict the order.
    """
    stages = []
    previous: Optional[JobConfig] = None
    for number, path in enumerate(files, start=1):
        extra = list(overrides)
        if run_dir is not None:
            extra += [f"checkpoint.save_dir={Path(run_dir) / path.stem}",
                      f"logging.tensorboard_dir={Path(run_dir) / path.stem / 'tb'}"]
        if previous is not None:
            extra.append(f"checkpoint.continue_from={previous.checkpoint.save_dir}")
        cfg = load_config(path, extra)
        if (cfg.stage.number, cfg.stage.count) != (number, len(files)):
            raise ConfigError(f"{path}: stage.number={cfg.stage.number}, stage.count={cfg.stage.count}, "
                              f"but it is stage {number} of {len(files)} in the pipeline")
        if not cfg.checkpoint.save_dir:
            raise ConfigError(f"{path}: checkpoint.save_dir is required in a pipeline stage")
        if previous is not None and cfg.checkpoint.save_dir == previous.checkpoint.save_dir:
            raise ConfigError(f"{path}: checkpoint.save_dir={cfg.checkpoint.save_dir} is the previous "
                              "stage's too; each stage needs its own")
        stages.append((path, extra, cfg))
        previous = cfg
    return stages


def run_pipeline(files: Sequence[Path], launch: Launcher, *, overrides: Sequence[str] = (),
                 run_dir: Optional[Path] = None, hf_out: Optional[Path] = None) -> Path:
    """Run every unfinished stage in order, then convert the last one to HF; returns its save_dir.

    Raises:
        ConfigError: see :func:`plan_pipeline`.
        RuntimeError: a stage ended without reaching its train_tokens.
    """
    stages = plan_pipeline(files, overrides, run_dir)
    for path, extra, cfg in stages:
        label = f"stage {cfg.stage.number}/{cfg.stage.count} ({path.name})"
        if stage_finished(cfg):
            logger.info("%s: finished earlier in %s, skipped", label, cfg.checkpoint.save_dir)
            continue
        logger.info("%s: training to %s tokens into %s", label, f"{cfg.train.train_tokens:,}",
                    cfg.checkpoint.save_dir)
        launch(path, extra)
        if not stage_finished(cfg):
            raise RuntimeError(f"{label}: the launcher returned but {cfg.checkpoint.save_dir} has no "
                               f"checkpoint at {cfg.train.train_tokens:,} tokens")
    last = stages[-1][2]
    if hf_out is not None:
        from megatron_tinyllama.checkpoint.convert import convert_to_hf

        convert_to_hf(last.checkpoint.save_dir, hf_out, tokenizer_model=last.data.tokenizer_model,
                      overwrite=True)
        logger.info("converted the last stage to Hugging Face format: %s", hf_out)
    return Path(last.checkpoint.save_dir)


def cluster_launcher(hostfile: Path, launcher_args: Sequence[str] = ()) -> Launcher:
    """Each stage as ``deepspeed --hostfile H [launcher_args] --module ... --config R ...``, from the
    head node (the launcher reaches the other nodes over ssh, as a single training run does)."""
    from megatron_tinyllama.launch import read_hostfile

    world = sum(read_hostfile(hostfile).values())
    launcher = shutil.which("deepspeed") or "deepspeed"

    def launch(recipe: Path, overrides: list[str]) -> None:
        subprocess.run([launcher, "--hostfile", str(hostfile), *launcher_args,
                        "--module", "megatron_tinyllama.train.pretrain", "--config", str(recipe),
                        f"parallel.expected_world_size={world}", *overrides], check=True)

    return launch


def local_launcher(ranks: int, work_dir: Path, nodes: int = 1) -> Launcher:
    """Each stage on this machine: ``nodes`` simulated nodes of ``ranks`` local ranks (CPU or GPUs)."""
    from megatron_tinyllama.launch import launch_local

    def launch(recipe: Path, overrides: list[str]) -> None:
        launch_local(recipe, nodes=nodes, ranks_per_node=ranks, work_dir=Path(work_dir),
                     overrides=overrides, log_path=Path(work_dir) / f"{recipe.stem}.log")

    return launch


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a multi-stage recipe (TinyLlama v1.1) stage by stage, each continuing the "
                    "previous one, then convert the last stage to Hugging Face format.")
    parser.add_argument("--variant", required=True, help="general, math_code, chinese (the stage files' suffix)")
    parser.add_argument("--recipes-dir", type=Path, default=REPO_V1_1)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--hostfile", type=Path, help="cluster: launch each stage over this hostfile")
    where.add_argument("--local-ranks", type=int, help="this machine: ranks per (simulated) node")
    parser.add_argument("--nodes", type=int, default=1, help="simulated nodes with --local-ranks")
    parser.add_argument("--launcher-arg", action="append", default=[],
                        help="extra deepspeed launcher argument (repeatable), e.g. --launcher-arg=--ssh_port=2222")
    parser.add_argument("--run-dir", type=Path, help="put each stage's save_dir under this folder")
    parser.add_argument("--hf-out", type=Path, help="convert the last stage here (HF Llama)")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE",
                        help="applied to every stage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        files = stage_recipes(args.recipes_dir, args.variant)
        if args.hostfile:
            launch = cluster_launcher(args.hostfile, args.launcher_arg)
        else:
            launch = local_launcher(args.local_ranks, args.run_dir or Path("runs/pipeline"), args.nodes)
        run_pipeline(files, launch, overrides=args.overrides, run_dir=args.run_dir, hf_out=args.hf_out)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
