"""Training checkpoints: what a run saves, and what it starts from.

This module owns the layout of ``checkpoint.save_dir``, the save, the retention of old checkpoints,
and the decision of where a run starts (resume, a previous stage, weights only, or nothing); the
integrity check (manifest, completion marker) is checkpoint.manifest's::

    latest                      tag of the checkpoint to resume from (written last, atomically)
    config.yaml                 the resolved recipe of the run
    metrics.jsonl               one JSON record per logged step (written by the trainer)
    job.lock                    held by the one job using this save_dir (checkpoint.lock)
    global_step000100/          DeepSpeed's files (ZeRO shards, optimizer states) for step 100
        rng/rank00000.pt        every rank's RNG states
        model/                  per-TP-rank full fp32 weights (see checkpoint.native), for the
                                converter, for ``init_from`` and as the master weights of a
                                resume on another layout
        optim/                  the AdamW moments, layout-free (see checkpoint.reshard)
        manifest.json           size and hash of every file above
        trainer_state.json      counters, recipe, layout, tokenizer: written last = complete

**Complete.** A checkpoint is complete when its ``trainer_state.json`` exists; it is written after
every other file and the manifest, so a kill at any point of a save leaves an incomplete
directory that nothing reads. Before loading, every rank re-hashes a share of the files against
the manifest; a truncated or corrupt file is named, the checkpoint is set aside as
``<tag>.corrupt`` (resume) and the previous complete checkpoint is used.

**Where a run starts** (:func:`plan_start`, before anything is built; :func:`start_state` after):
its own ``save_dir``'s checkpoint named by ``latest`` (or, when ``latest`` is missing or names no
complete checkpoint, the newest complete one, said in the log), else ``checkpoint.continue_from``
(a previous stage: full state), else ``checkpoint.init_from`` (weights only), else nothing. The
saved model shape and tokenizer are compared with the recipe and every difference is named before
the run refuses. On the layout it was written at, a checkpoint loads through DeepSpeed; on another
(data-parallel size, TP degree, ZeRO stage, node-local sharding), through checkpoint.reshard.

**Retention** keeps the ``keep_last`` newest complete checkpoints *of this run* (by step number,
and only those carrying this run's id): a run never deletes checkpoints it did not write.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from megatron_tinyllama.checkpoint.compat import (
    DATA_ORDER_FIELDS,
    data_order_differences,
    file_fingerprint,
    layout_change,
    layout_differences,
    model_differences,
    other_differences,
    saved_layout,
    tokenizer_differences,
)
from megatron_tinyllama.checkpoint.hf import ConversionError
from megatron_tinyllama.checkpoint.manifest import (
    TRAINER_STATE,
    checkpoint_problems,
    rank_world,
    read_trainer_state,
    write_atomic,
    write_manifest,
)
from megatron_tinyllama.checkpoint.native import (
    MODEL_INDEX,
    SharedFileFiller,
    create_shared_model_file,
    read_model_index,
    save_torch_file,
    shard_filename,
    write_model_index,
)
from megatron_tinyllama.checkpoint.reshard import (
    ReshardError,
    engine_layout,
    has_layout_free_state,
    load_resharded,
    owned_names,
    save_optimizer_state,
)
from megatron_tinyllama.checkpoint.weights import (
    check_tp_replicas,
    load_weights_into_engine,
    param_shape,
    read_shard_for_rank,
    write_master_weights,
)
from megatron_tinyllama.config import ConfigError, JobConfig

logger = logging.getLogger(__name__)

_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected, or one that cannot be loaded."""


@dataclass
class TrainerState:
    """Progress counters that, with the DeepSpeed state, make a resume exact."""

    step: int = 0
    consumed_samples: int = 0
    """Global samples consumed (the data position), counted across stages."""
    consumed_tokens: int = 0
    """Tokens consumed, counted across stages (the LR schedule's clock)."""
    skipped_steps: int = 0
    stage_start_samples: int = 0
    """Data position where this stage started (sizes its datasets, starts its mixture warm-up)."""
    stage_start_tokens: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    """Identifies the checkpoints this run (across its resumes) wrote; retention prunes only these."""

    def samples_needed(self, cfg: JobConfig, global_batch_size: int) -> int:
        """Global sample index this stage's data must reach (one batch of slack)."""
        remaining = max(0, cfg.train.train_tokens - self.stage_start_tokens)
        return self.stage_start_samples + math.ceil(remaining / cfg.model.seq_length) + global_batch_size


def step_tag(step: int) -> str:
    return f"global_step{step:06d}"


def tag_step(name: str) -> Optional[int]:
    """The step of a checkpoint directory name, None for anything else (``*.corrupt`` too)."""
    match = _TAG.match(name)
    return int(match.group(1)) if match else None


def read_latest(save_dir: Path) -> Optional[str]:
    """The tag ``latest`` names when that checkpoint is complete, else None."""
    latest = Path(save_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if tag and read_trainer_state(Path(save_dir) / tag) is not None else None


def complete_checkpoints(save_dir: Path) -> list[Path]:
    """Complete checkpoint directories of ``save_dir``, newest step first."""
    found = []
    for path in Path(save_dir).glob("global_step*"):
        step = tag_step(path.name)
        if step is not None and path.is_dir() and read_trainer_state(path) is not None:
            found.append((step, path))
    return [path for _, path in sorted(found, reverse=True)]


def resume_candidates(save_dir: Path) -> list[Path]:
    """Checkpoints to try, in order: the one ``latest`` names and the complete ones before it.

    When ``latest`` is missing or names no complete checkpoint, every complete checkpoint, newest
    first (and the log says so). ``latest`` is respected when it names an older complete
    checkpoint: that is how a user rolls a run back.
    """
    save_dir = Path(save_dir)
    complete = complete_checkpoints(save_dir)
    latest_file = save_dir / "latest"
    named = latest_file.read_text().strip() if latest_file.is_file() else None
    if named and read_trainer_state(save_dir / named) is not None:
        step = tag_step(named)
        return [save_dir / named] + [p for p in complete if step is not None and tag_step(p.name) < step]
    if complete and named:
        state = "is missing" if not (save_dir / named).exists() else "is incomplete"
        logger.warning("%s: 'latest' names %s, which %s; using the newest complete checkpoint %s",
                       save_dir, named, state, complete[0].name)
    elif complete:
        logger.warning("%s: no 'latest' file; using the newest complete checkpoint %s", save_dir,
                       complete[0].name)
    return complete


def resolve_model_dir(source: Union[str, Path]) -> Path:
    """Find the model weights in ``source``: a model directory, a checkpoint tag directory, or a
    training save directory (the checkpoint ``latest`` names, falling back to the previous
    complete one when that is missing or damaged, with a warning naming the file).

    Collective under torch.distributed when ``source`` is a save directory (the files are checked
    against the checkpoint's manifest by all ranks).

    Raises:
        ConversionError: nothing convertible there.
    """
    source = Path(source)
    if (source / MODEL_INDEX).is_file():
        return source
    if (source / "model" / MODEL_INDEX).is_file():
        return source / "model"
    candidates = resume_candidates(source) if source.is_dir() else []
    if not candidates:
        raise ConversionError(f"{source}: no {MODEL_INDEX}, model/ or complete checkpoint found; "
                              "not a checkpoint")
    skipped = []
    for tag_dir in candidates:
        problems = [p for p in checkpoint_problems(tag_dir, only="model")]
        if not (tag_dir / "model" / MODEL_INDEX).is_file():
            problems.append(f"{tag_dir / 'model' / MODEL_INDEX}: missing")
        if not problems:
            if skipped:
                logger.warning("%s: using %s instead (%s)", source, tag_dir.name, "; ".join(skipped))
            return tag_dir / "model"
        skipped.append(f"{tag_dir.name} is damaged: {problems[0]}")
    raise ConversionError(f"{source}: no intact model export: " + "; ".join(skipped))


# ---------------------------------------------------------------------------------------------
# Saving.


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _set_aside(tag_dir: Path, label: str) -> Path:
    """Rename a checkpoint directory out of the way (``<tag>.<label>[-n]``); nothing is deleted."""
    aside, n = tag_dir.with_name(f"{tag_dir.name}.{label}"), 1
    while aside.exists():
        n += 1
        aside = tag_dir.with_name(f"{tag_dir.name}.{label}-{n}")
    os.replace(tag_dir, aside)
    return aside


def _clear_tag_dir(tag_dir: Path) -> None:
    """Make room for a save: an incomplete leftover is garbage, a complete one is moved aside."""
    if not tag_dir.exists():
        return
    if read_trainer_state(tag_dir) is None:
        shutil.rmtree(tag_dir)
        return
    aside = _set_aside(tag_dir, "replaced")
    logger.warning("%s already held a complete checkpoint (the run was rolled back); kept as %s",
                   tag_dir, aside.name)


def _name_write_errors(engine) -> None:
    """Make DeepSpeed's torch checkpoint engine write through :func:`save_torch_file`.

    DeepSpeed hands ``torch.save`` a path, and on a full disk torch's C++ writer then fails with
    "basic_ios::clear: iostream error" (or "unexpected pos"): no errno, no file. Only the stock
    ``TorchCheckpointEngine`` is replaced; its ``save`` is that one ``torch.save`` call
    (DeepSpeed 0.16-0.19).
    """
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if type(ckpt_engine).__name__ != "TorchCheckpointEngine" or getattr(ckpt_engine, "_named", False):
        return

    def save(state_dict, path):
        save_torch_file(state_dict, path,
                        _use_new_zipfile_serialization=getattr(ckpt_engine, "zipfile_serialization", True))

    ckpt_engine.save = save
    ckpt_engine._named = True


def save_training_checkpoint(engine, cfg: JobConfig, state: TrainerState) -> Path:
    """Save everything for an exact resume, then point ``latest`` at it. Collective: all ranks.

    Raises:
        ReplicaDriftError: TP-replicated parameters differ (the checkpoint is left incomplete).
        CheckpointWriteError: a file could not be written (named, with the errno: ``ENOSPC`` for a
            full disk); raised on the rank that failed, ``latest`` and earlier checkpoints are
            untouched and this one stays incomplete.
    """
    from megatron.core import parallel_state

    save_dir = Path(cfg.checkpoint.save_dir)
    tag = step_tag(state.step)
    tag_dir = save_dir / tag
    rank = dist.get_rank()
    if rank == 0:
        _clear_tag_dir(tag_dir)
    dist.barrier()
    _name_write_errors(engine)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)
    seconds["DeepSpeed's files"], clock = time.perf_counter() - clock, time.perf_counter()
    (tag_dir / "rng").mkdir(parents=True, exist_ok=True)
    save_torch_file(_rng_state(), tag_dir / "rng" / f"rank{rank:05d}.pt")
    # Every data-parallel rank of a TP rank streams its part of that TP rank's weights file into
    # place, one parameter at a time (under ZeRO-3 its own partition of every tensor, gathering
    # nothing): no rank waits for one writer of the whole model, none holds the whole model.
    shapes = {name: param_shape(p) for name, p in engine.module.named_parameters()}
    mine = owned_names(shapes, parallel_state.get_data_parallel_rank(),
                       parallel_state.get_data_parallel_world_size())
    tp_rank, tp_size = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    model_file = tag_dir / "model" / shard_filename(tp_rank, tp_size)
    if parallel_state.get_data_parallel_rank() == 0:
        (tag_dir / "model").mkdir(parents=True, exist_ok=True)
        create_shared_model_file(model_file, shapes)
        if tp_rank == 0:
            write_model_index(tag_dir / "model", cfg.model, tp_size)
    dist.barrier()
    filler = SharedFileFiller(model_file, shapes)
    try:
        replicated = write_master_weights(engine, filler.write, mine)
    finally:
        filler.close()
    check_tp_replicas(engine, replicated, cfg.checkpoint.tp_replica_tolerance)
    del replicated
    seconds["weights"], clock = time.perf_counter() - clock, time.perf_counter()
    if cfg.checkpoint.reshardable:
        save_optimizer_state(engine, tag_dir)
    dist.barrier()
    seconds["moments"], clock = time.perf_counter() - clock, time.perf_counter()
    write_manifest(tag_dir)
    seconds["manifest"] = time.perf_counter() - clock
    if rank == 0:
        payload = {**asdict(state), "config": cfg.to_dict(), "world_size": dist.get_world_size(),
                   "layout": engine_layout(engine),
                   "tokenizer_fingerprint": file_fingerprint(cfg.data.tokenizer_model)}
        write_atomic(tag_dir / TRAINER_STATE, json.dumps(payload, indent=2))
        write_atomic(save_dir / "latest", tag)
        prune_checkpoints(save_dir, keep=cfg.checkpoint.keep_last, run_id=state.run_id, current=tag)
    dist.barrier()
    # Where a save's time goes (rank 0's clock; the barriers make it every rank's).
    logger.info("saved checkpoint %s in %.1f s (%s)", tag_dir, sum(seconds.values()),
                ", ".join(f"{part} {value:.1f} s" for part, value in seconds.items()))
    return tag_dir


def prune_checkpoints(save_dir: Path, keep: int, run_id: str, current: str) -> list[str]:
    """Delete this run's complete checkpoints beyond the ``keep`` newest up to ``current``.

    Only checkpoints carrying ``run_id`` are candidates, ordered by step number (not by name:
    ``global_step1000000`` sorts before ``global_step999999`` as text). Checkpoints newer than
    ``current`` (left by a run that was rolled back) are not touched. Returns the deleted tags.
    """
    if keep <= 0:
        return []
    limit = tag_step(current)
    ours = [p for p in complete_checkpoints(save_dir)
            if read_trainer_state(p).get("run_id") == run_id and tag_step(p.name) <= limit]
    deleted = []
    for path in ours[keep:]:
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path.name)
    return deleted


# ---------------------------------------------------------------------------------------------
# Where a run starts.


@dataclass
class StartPlan:
    """Decided before anything is built; carried out by :func:`start_state`."""

    kind: Literal["resume", "continue", "init", "fresh"]
    candidates: list[Path] = field(default_factory=list)
    """Checkpoint directories to try in order (resume, continue)."""
    init_dir: Optional[Path] = None
    """Model directory (init)."""


def _refuse(what: str, where: Path, diffs: list[str]) -> None:
    if diffs:
        raise ConfigError(f"{what} {where} does not fit this recipe: " + "; ".join(diffs))


def _check_checkpoint_fits(tag_dir: Path, cfg: JobConfig, world_size: int, *, resume: bool) -> None:
    payload = read_trainer_state(tag_dir) or {}
    saved_model = payload.get("config", {}).get("model", {})
    diffs = model_differences(saved_model, cfg.model, include_seq_length=resume) + tokenizer_differences(payload, cfg)
    layout = layout_differences(payload, cfg, world_size)
    if layout and not has_layout_free_state(tag_dir):
        diffs += layout + ["the checkpoint has no layout-free optimizer state to reshard (optim/: written "
                           "when checkpoint.reshardable is true)"]
    _refuse("resuming from" if resume else "continuing from", tag_dir, diffs)
    saved_cfg = payload.get("config", {})
    # A new stage (continue_from) may change its data; a resume of the same run that does reads
    # other samples than the run had planned from here on, so it is a warning.
    reorder = data_order_differences(saved_cfg, cfg) if resume else []
    if reorder and rank_world()[0] == 0:
        logger.warning("resuming from %s with recipe changes that alter the data order (the samples "
                       "from here on are not the ones this run had planned): %s", tag_dir,
                       "; ".join(reorder))
    changed = other_differences(saved_cfg, cfg, exclude=DATA_ORDER_FIELDS if resume else ())
    if changed:
        logger.info("%s %s with these recipe changes: %s", "resuming" if resume else "continuing from",
                    tag_dir, "; ".join(changed))


def _continue_candidates(source: Path) -> list[Path]:
    if read_trainer_state(source) is not None and tag_step(source.name) is not None:
        return [source]
    candidates = resume_candidates(source) if source.is_dir() else []
    if not candidates:
        raise ConfigError(f"checkpoint.continue_from={source}: no complete training checkpoint there "
                          "(a previous stage's save_dir or one of its global_step* directories)")
    return candidates


def plan_start(cfg: JobConfig, world_size: int) -> StartPlan:
    """Decide where the run starts and refuse a checkpoint that does not fit, before any build.

    Raises:
        ConfigError: the chosen checkpoint's model, layout or tokenizer differs (all named).
        CheckpointError: ``save_dir`` has a ``latest`` but no complete checkpoint to resume from.
    """
    ckpt = cfg.checkpoint
    if ckpt.save_dir:
        save_dir = Path(ckpt.save_dir)
        candidates = resume_candidates(save_dir)
        if candidates:
            _check_checkpoint_fits(candidates[0], cfg, world_size, resume=True)
            if ckpt.continue_from or ckpt.init_from:
                # The same command restarts a stage after a preemption, so this is the usual case,
                # not an error; but the recipe names another source, so say which one is used.
                field_name = "continue_from" if ckpt.continue_from else "init_from"
                logger.info("start: resuming from %s in checkpoint.save_dir; checkpoint.%s=%s is not "
                            "used (a run's own save_dir always wins once it holds a checkpoint)",
                            candidates[0], field_name, getattr(ckpt, field_name))
            return StartPlan("resume", candidates)
        if (save_dir / "latest").is_file():
            named = (save_dir / "latest").read_text().strip()
            raise CheckpointError(
                f"{save_dir}: 'latest' names {named}, but no complete checkpoint is there; refusing to "
                "start from scratch over it. Restore the checkpoint, or remove 'latest' to start anew")
    if ckpt.continue_from:
        candidates = _continue_candidates(Path(ckpt.continue_from))
        _check_checkpoint_fits(candidates[0], cfg, world_size, resume=False)
        payload = read_trainer_state(candidates[0])
        if payload["consumed_tokens"] >= cfg.train.train_tokens:
            raise ConfigError(
                f"train.train_tokens={cfg.train.train_tokens:,} is not beyond the {payload['consumed_tokens']:,} "
                f"tokens already consumed at {candidates[0]} (checkpoint.continue_from)")
        return StartPlan("continue", candidates)
    if ckpt.init_from:
        directory = resolve_model_dir(ckpt.init_from)
        saved_model, _ = read_model_index(directory)
        _refuse("checkpoint.init_from", directory, model_differences(dataclasses.asdict(saved_model), cfg.model))
        return StartPlan("init", init_dir=directory)
    return StartPlan("fresh")


def _load_full_state(engine, cfg: JobConfig, tag_dir: Path, *, own_run: bool) -> TrainerState:
    payload = read_trainer_state(tag_dir)
    known = {k: payload[k] for k in asdict(TrainerState()) if k in payload}
    state = TrainerState(**known)
    change = layout_change(saved_layout(payload), engine_layout(engine))
    try:
        if change:  # DeepSpeed's files hold this layout's shards: rebuild from the layout-free copy
            if not has_layout_free_state(tag_dir):
                raise ReshardError(f"written at another layout ({', '.join(change)}) without the "
                                   "layout-free optimizer state (optim/)")
            logger.info("resuming step %d on a new layout: %s (optimizer state resharded)", state.step,
                        ", ".join(change))
            load_resharded(engine, cfg.model, tag_dir)
            # DeepSpeed's own counters, as its load_checkpoint would have set them.
            engine.global_steps, engine.global_samples = state.step, state.consumed_samples
            engine.skipped_steps = state.skipped_steps
        else:
            engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
    except Exception as err:  # noqa: BLE001 - named and re-raised
        raise CheckpointError(f"loading {tag_dir} failed on rank {dist.get_rank()}: "
                              f"{type(err).__name__}: {err}") from err
    rng_file = tag_dir / "rng" / f"rank{dist.get_rank():05d}.pt"
    # Each rank's RNG stream belongs to its place in the layout; on another layout it means nothing.
    if rng_file.is_file() and not change and payload.get("world_size") == dist.get_world_size():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    if not own_run:  # a new stage: its own id, and its data and warm-up start here
        state.run_id = TrainerState().run_id
        state.stage_start_samples = state.consumed_samples
        state.stage_start_tokens = state.consumed_tokens
    return state


def start_state(engine, cfg: JobConfig, plan: StartPlan) -> TrainerState:
    """Carry out ``plan`` on the built engine and return the counters to train from. Collective.

    A resume or continuation verifies each candidate checkpoint's files against its manifest
    first; a bad one is named and skipped (set aside as ``<tag>.corrupt`` in the run's own
    save_dir) for the previous complete one.

    Raises:
        CheckpointError: every candidate is damaged.
    """
    from megatron.core import parallel_state

    if plan.kind in ("resume", "continue"):
        rejected = []
        for tag_dir in plan.candidates:
            problems = checkpoint_problems(tag_dir)
            if not problems:
                state = _load_full_state(engine, cfg, tag_dir, own_run=plan.kind == "resume")
                if rejected:
                    logger.warning("fell back to %s", tag_dir)
                logger.info("%s from %s: step %d, %s tokens", "resumed" if plan.kind == "resume" else
                            "continuing", tag_dir, state.step, f"{state.consumed_tokens:,}")
                return state
            logger.error("checkpoint %s is damaged and is skipped: %s", tag_dir, "; ".join(problems))
            rejected.append(f"{tag_dir.name}: {problems[0]}")
            if plan.kind == "resume" and dist.get_rank() == 0:
                logger.error("kept the damaged checkpoint as %s", _set_aside(tag_dir, "corrupt").name)
            dist.barrier()
        raise CheckpointError("no loadable checkpoint: " + "; ".join(rejected))
    if plan.kind == "init":
        shard = read_shard_for_rank(plan.init_dir, cfg.model, parallel_state.get_tensor_model_parallel_rank(),
                                    parallel_state.get_tensor_model_parallel_world_size())
        load_weights_into_engine(engine, shard, str(plan.init_dir))
        logger.info("initialised weights (and fp32 master weights) from %s", plan.init_dir)
    start = cfg.train.start_tokens
    return TrainerState(consumed_tokens=start, stage_start_tokens=start)
