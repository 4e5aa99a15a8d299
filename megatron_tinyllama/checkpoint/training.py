"""Training checkpoints: what a run saves, and what it starts from.

This module owns the layout of ``checkpoint.save_dir``, the retention of old checkpoints, and the
decision of where a run starts (resume, a previous stage, weights only, or nothing); the save is
checkpoint.saving's, the bytes of a checkpoint checkpoint.sharded's::

    latest                      tag of the checkpoint to resume from (written last, atomically)
    config.yaml                 the resolved recipe of the run
    metrics.jsonl               one JSON record per logged step (written by the trainer)
    job.lock                    held by the one job using this save_dir (checkpoint.lock)
    global_step000100/
        state/__<rank>_0.distcp one file per rank: its ranges of the fp32 master weights and the
                                AdamW moments, its RNG states (checkpoint.engine_state)
        state/.metadata         torch.distributed.checkpoint's index of every rank's ranges
        manifest.json           bytes and sha256 of every file, as the writers reported them
        trainer_state.json      counters, recipe, layout, tokenizer: written last = complete

One copy, written once: the same bytes resume the run on any layout (data-parallel size, TP
degree, ZeRO stage, node-local sharding), feed the HF converter and ``init_from``
(checkpoint.per_rank). Checkpoints written before per-rank files (DeepSpeed's files + ``model/`` +
``optim/`` + ``rng/``) still resume, convert and verify as before.

**Complete.** A checkpoint is complete when its ``trainer_state.json`` exists; rank 0 writes it
after every rank's file is written and synced and the manifest is written, so a kill at any point
of a save (background or not) leaves an incomplete directory that nothing reads and ``latest`` on
the previous checkpoint. Before loading, every rank re-hashes its share of the files against the
manifest (the file its own writer wrote, at the same layout); a truncated or corrupt file is
named, the checkpoint is set aside as ``<tag>.corrupt`` (resume) and the previous complete one is
used.

**Where a run starts** (:func:`plan_start`, before anything is built; :func:`start_state` after):
its own ``save_dir``'s checkpoint named by ``latest`` (or, when ``latest`` is missing or names no
complete checkpoint, the newest complete one, said in the log), else ``checkpoint.continue_from``
(a previous stage: full state), else ``checkpoint.init_from`` (weights only), else nothing. The
saved model shape and tokenizer are compared with the recipe and every difference is named before
the run refuses. A per-rank checkpoint loads through checkpoint.reshard on any layout, each rank
reading the ranges it holds; an older one through DeepSpeed on its own layout.

**Retention** keeps the ``keep_last`` newest complete checkpoints *of this run* (by step number,
and only those carrying this run's id): a run never deletes checkpoints it did not write.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import torch
import torch.distributed as dist

from megatron_tinyllama.checkpoint.compat import (
    DATA_ORDER_FIELDS,
    data_order_differences,
    layout_change,
    model_differences,
    other_differences,
    saved_layout,
    tokenizer_differences,
)
from megatron_tinyllama.checkpoint.hf import ConversionError
from megatron_tinyllama.checkpoint.manifest import (
    checkpoint_problems,
    rank_world,
    read_trainer_state,
    read_trainer_state_problems,
)
from megatron_tinyllama.checkpoint.native import MODEL_INDEX
from megatron_tinyllama.checkpoint.per_rank import FORMAT as PER_RANK_FORMAT
from megatron_tinyllama.checkpoint.per_rank import is_per_rank_checkpoint, read_model_index, rng_key
from megatron_tinyllama.checkpoint.reshard import engine_layout, has_layout_free_state, load_resharded
from megatron_tinyllama.checkpoint.weights import load_weights_into_engine, read_shard_for_rank
from megatron_tinyllama.config import ConfigError, JobConfig
from megatron_tinyllama.engine.ds_config import Layout, planned_layout

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
    """Complete checkpoint directories of ``save_dir``, newest step first. One whose
    trainer_state.json is there but malformed is not used, and the log names the file and field."""
    found = []
    for path in Path(save_dir).glob("global_step*"):
        step = tag_step(path.name)
        if step is None or not path.is_dir():
            continue
        if read_trainer_state(path) is not None:
            found.append((step, path))
        elif problems := read_trainer_state_problems(path):
            if rank_world()[0] == 0:
                logger.error("checkpoint %s is not used: %s", path.name, "; ".join(problems))
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
    # (A run saving beside this reader may have made the named checkpoint complete since the
    # listing: then it is the newest complete one, and not "missing".)
    if named and (read_trainer_state(save_dir / named) is not None or (complete and complete[0].name == named)):
        step = tag_step(named)
        return [save_dir / named] + [p for p in complete if step is not None and tag_step(p.name) < step]
    if complete and named:
        state = ("is missing" if not (save_dir / named).exists() else "is not usable (named above)"
                 if read_trainer_state_problems(save_dir / named) else "is incomplete")
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
    # A run that trains on prunes its old checkpoints: one may vanish while it is read. That is
    # not damage: the checkpoints are listed anew and the newest complete one taken again.
    for _ in range(_VANISHED_RETRIES):
        try:
            return _resolve_in(source)
        except _Vanished as gone:
            logger.info("%s: %s was pruned while it was read; looking again", source, gone)
    return _resolve_in(source)


_VANISHED_RETRIES = 5


class _Vanished(Exception):
    """A checkpoint directory disappeared while it was checked (pruned by the run that wrote it)."""


def _resolve_in(source: Path) -> Path:
    if is_per_rank_checkpoint(source):
        candidates = [source]
    else:
        candidates = resume_candidates(source) if source.is_dir() else []
    if not candidates:
        raise ConversionError(f"{source}: no {MODEL_INDEX}, model/ or complete checkpoint found; "
                              "not a checkpoint")
    skipped = []
    for tag_dir in candidates:
        # A per-rank checkpoint's weights are in every rank's file: all of it is checked.
        per_rank = is_per_rank_checkpoint(tag_dir)
        problems = checkpoint_problems(tag_dir, only=None if per_rank else "model")
        if not per_rank and not (tag_dir / "model" / MODEL_INDEX).is_file():
            problems.append(f"{tag_dir / 'model' / MODEL_INDEX}: missing")
        if not problems:
            if skipped:
                logger.warning("%s: using %s instead (%s)", source, tag_dir.name, "; ".join(skipped))
            return tag_dir if per_rank else tag_dir / "model"
        if not tag_dir.exists() and source != tag_dir:
            raise _Vanished(tag_dir.name)
        skipped.append(f"{tag_dir.name} is damaged: {problems[0]}")
    raise ConversionError(f"{source}: no intact model export: " + "; ".join(skipped))


# ---------------------------------------------------------------------------------------------
# Making room for a save, and retention (the save itself: checkpoint.saving).


def _set_aside(tag_dir: Path, label: str) -> Path:
    """Rename a checkpoint directory out of the way (``<tag>.<label>[-n]``); nothing is deleted."""
    aside, n = tag_dir.with_name(f"{tag_dir.name}.{label}"), 1
    while aside.exists():
        n += 1
        aside = tag_dir.with_name(f"{tag_dir.name}.{label}-{n}")
    os.replace(tag_dir, aside)
    return aside


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
    """Decided before anything is built, from the recipe, the world and what the checkpoints say
    (:func:`plan_start`); carried out by :func:`start_state`."""

    kind: Literal["resume", "continue", "init", "fresh"]
    candidates: list[Path] = field(default_factory=list)
    """Checkpoint directories to try in order (resume, continue): each one checked to fit."""
    init_dir: Optional[Path] = None
    """Model directory (init)."""
    target: Optional[Layout] = None
    """The layout the engine will run (engine/ds_config.planned_layout); checked once built."""
    methods: dict[Path, str] = field(default_factory=dict)
    """How each candidate loads: ``per-rank`` (any layout), ``deepspeed`` (an older checkpoint at
    its own layout and precision: DeepSpeed's files) or ``layout-free`` (an older checkpoint
    elsewhere: its model/ + optim/)."""


def _refuse(what: str, where: Path, diffs: list[str]) -> None:
    if diffs:
        raise ConfigError(f"{what} {where} does not fit this recipe: " + "; ".join(diffs))


def _load_method(payload: dict, tag_dir: Path, cfg: JobConfig, target: Layout) -> tuple[str, list[str]]:
    """How a checkpoint loads into ``target`` and, when it cannot, why (the differences)."""
    if payload.get("checkpoint_format") == PER_RANK_FORMAT:
        return "per-rank", []
    change = layout_change(saved_layout(payload), target.as_dict())
    saved_precision = payload.get("config", {}).get("train", {}).get("precision")
    if saved_precision is not None and saved_precision != cfg.train.precision:
        # DeepSpeed's optimizer files are named and laid out by precision (bf16_zero_pp_rank...).
        change.append(f"train.precision {saved_precision} -> {cfg.train.precision}")
    if not change:
        return "deepspeed", []
    if has_layout_free_state(tag_dir):
        return "layout-free", []
    return "", change + ["the checkpoint has no layout-free optimizer state to load them from (optim/: "
                         "written by checkpoints before per-rank files when checkpoint.reshardable was true)"]


def _check_checkpoint_fits(tag_dir: Path, cfg: JobConfig, target: Layout, *, resume: bool,
                           quiet: bool = False) -> str:
    """Refuse a checkpoint that does not fit the recipe on ``target`` (every difference named);
    return how it loads. ``quiet``: a fallback, checked by the same rule without the log lines."""
    payload = read_trainer_state(tag_dir) or {}
    saved_model = payload.get("config", {}).get("model", {})
    diffs = model_differences(saved_model, cfg.model, include_seq_length=resume) + tokenizer_differences(payload, cfg)
    method, layout = _load_method(payload, tag_dir, cfg, target)
    _refuse("resuming from" if resume else "continuing from", tag_dir, diffs + layout)
    if quiet:
        return method
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
    return method


def _fitting(candidates: list[Path], cfg: JobConfig, target: Layout, *, resume: bool) -> dict[Path, str]:
    """Each candidate's load method, the first checked loudly (it refuses the run when it does
    not fit); a fallback that does not fit is left out, said."""
    methods = {candidates[0]: _check_checkpoint_fits(candidates[0], cfg, target, resume=resume)}
    for tag_dir in candidates[1:]:
        try:
            methods[tag_dir] = _check_checkpoint_fits(tag_dir, cfg, target, resume=resume, quiet=True)
        except ConfigError as err:
            logger.warning("%s is not a fallback for this run: %s", tag_dir, err)
    return methods


def _continue_candidates(source: Path) -> list[Path]:
    if read_trainer_state(source) is not None and tag_step(source.name) is not None:
        return [source]
    candidates = resume_candidates(source) if source.is_dir() else []
    if not candidates:
        raise ConfigError(f"checkpoint.continue_from={source}: no complete training checkpoint there "
                          "(a previous stage's save_dir or one of its global_step* directories)")
    return candidates


def plan_start(cfg: JobConfig, world_size: int, local_world_size: Optional[int] = None) -> StartPlan:
    """Decide where the run starts, on which layout and how each candidate checkpoint loads, and
    refuse a checkpoint that does not fit, before any build. A pure function of the recipe, the
    world (``local_world_size`` ranks per node; default: one node) and the save_dir's small files.

    Raises:
        ConfigError: the chosen checkpoint's model, layout or tokenizer differs (all named).
        CheckpointError: ``save_dir`` has a ``latest`` but no complete checkpoint to resume from.
    """
    ckpt = cfg.checkpoint
    target = planned_layout(cfg, world_size, local_world_size or world_size)
    if ckpt.save_dir:
        save_dir = Path(ckpt.save_dir)
        candidates = resume_candidates(save_dir)
        if candidates:
            methods = _fitting(candidates, cfg, target, resume=True)
            if ckpt.continue_from or ckpt.init_from:
                # The same command restarts a stage after a preemption, so this is the usual case,
                # not an error; but the recipe names another source, so say which one is used.
                field_name = "continue_from" if ckpt.continue_from else "init_from"
                logger.info("start: resuming from %s in checkpoint.save_dir; checkpoint.%s=%s is not "
                            "used (a run's own save_dir always wins once it holds a checkpoint)",
                            candidates[0], field_name, getattr(ckpt, field_name))
            return StartPlan("resume", list(methods), target=target, methods=methods)
        if (save_dir / "latest").is_file():
            named = (save_dir / "latest").read_text().strip()
            raise CheckpointError(
                f"{save_dir}: 'latest' names {named}, but no complete checkpoint is there; refusing to "
                "start from scratch over it. Restore the checkpoint, or remove 'latest' to start anew")
    if ckpt.continue_from:
        candidates = _continue_candidates(Path(ckpt.continue_from))
        methods = _fitting(candidates, cfg, target, resume=False)
        payload = read_trainer_state(candidates[0])
        if payload["consumed_tokens"] >= cfg.train.train_tokens:
            raise ConfigError(
                f"train.train_tokens={cfg.train.train_tokens:,} is not beyond the {payload['consumed_tokens']:,} "
                f"tokens already consumed at {candidates[0]} (checkpoint.continue_from)")
        return StartPlan("continue", list(methods), target=target, methods=methods)
    if ckpt.init_from:
        directory = resolve_model_dir(ckpt.init_from)
        saved_model, _ = read_model_index(directory)
        _refuse("checkpoint.init_from", directory, model_differences(dataclasses.asdict(saved_model), cfg.model))
        return StartPlan("init", init_dir=directory, target=target)
    return StartPlan("fresh", target=target)


def _load_full_state(engine, cfg: JobConfig, tag_dir: Path, method: str, *, own_run: bool) -> TrainerState:
    payload = read_trainer_state(tag_dir)
    known = {k: payload[k] for k in asdict(TrainerState()) if k in payload}
    state = TrainerState(**known)
    per_rank = method == "per-rank"
    change = layout_change(saved_layout(payload), engine_layout(engine))
    try:
        if method in ("per-rank", "layout-free"):
            # The layout-free state: a per-rank checkpoint at any layout, or an older checkpoint's
            # model/ + optim/ on another layout or precision than its DeepSpeed files were written at.
            if change:
                logger.info("resuming step %d on a new layout: %s (optimizer state resharded)", state.step,
                            ", ".join(change))
            load_resharded(engine, cfg.model, tag_dir)
            # DeepSpeed's own counters, as its load_checkpoint would have set them.
            engine.global_steps, engine.global_samples = state.step, state.consumed_samples
            engine.skipped_steps = state.skipped_steps
        else:  # a checkpoint written before per-rank files, at its own layout: DeepSpeed's files
            engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
    except Exception as err:  # noqa: BLE001 - named and re-raised
        raise CheckpointError(f"loading {tag_dir} failed on rank {dist.get_rank()}: "
                              f"{type(err).__name__}: {err}") from err
    # Each rank's RNG stream belongs to its place in the layout; on another layout it means nothing.
    if not change and payload.get("world_size") == dist.get_world_size():
        _restore_rng(tag_dir, per_rank)
    if not own_run:  # a new stage: its own id, and its data and warm-up start here
        state.run_id = TrainerState().run_id
        state.stage_start_samples = state.consumed_samples
        state.stage_start_tokens = state.consumed_tokens
    return state


def _restore_rng(tag_dir: Path, per_rank: bool) -> None:
    import io

    from megatron_tinyllama.checkpoint.engine_state import set_rng
    from megatron_tinyllama.checkpoint.sharded import RangeReader

    rank = dist.get_rank()
    if per_rank:
        key = rng_key(rank)
        _, blobs = RangeReader(tag_dir).read({}, blobs=(key,))
        set_rng(torch.load(io.BytesIO(blobs[key]), weights_only=False))
        return
    rng_file = tag_dir / "rng" / f"rank{rank:05d}.pt"
    if rng_file.is_file():
        set_rng(torch.load(rng_file, weights_only=False))


def start_state(engine, cfg: JobConfig, plan: StartPlan) -> TrainerState:
    """Carry out ``plan`` on the built engine and return the counters to train from. Collective.

    A resume or continuation verifies each candidate checkpoint's files against its manifest
    first; a bad one is named and skipped (set aside as ``<tag>.corrupt`` in the run's own
    save_dir) for the previous complete one.

    Raises:
        CheckpointError: every candidate is damaged.
    """
    from megatron.core import parallel_state

    running = engine_layout(engine)
    if plan.target is not None and running != plan.target.as_dict():
        raise CheckpointError(f"the engine was built for {running}, the start plan for "
                              f"{plan.target.as_dict()}: report this (the layout is decided in "
                              "engine/ds_config.planned_layout alone)")
    if plan.kind in ("resume", "continue"):
        rejected = []
        for tag_dir in plan.candidates:
            problems = checkpoint_problems(tag_dir)
            if not problems:
                state = _load_full_state(engine, cfg, tag_dir, plan.methods.get(tag_dir, "per-rank"),
                                         own_run=plan.kind == "resume")
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
