"""Saving training checkpoints: in the background, one copy, one file per rank.

This module owns the save of a training checkpoint (checkpoint.training owns the layout of the
save_dir, retention and where a run starts; checkpoint.sharded the bytes): what a rank stages,
the background write and its completion (the manifest from the writers, ``trainer_state.json``,
``latest``, retention), and the errors a save can end in.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tinyllama.checkpoint.compat import file_fingerprint
from megatron_tinyllama.checkpoint.manifest import MANIFEST, TRAINER_STATE, read_trainer_state, write_atomic
from megatron_tinyllama.checkpoint.native import CheckpointWriteError
from megatron_tinyllama.checkpoint.per_rank import FORMAT as PER_RANK_FORMAT
from megatron_tinyllama.checkpoint.per_rank import rng_key, shapes_key
from megatron_tinyllama.checkpoint.reshard import adam_step, engine_layout
from megatron_tinyllama.checkpoint.sharded import first_failure, manifest_json, save_ranges
from megatron_tinyllama.checkpoint.training import (
    CheckpointError,
    TrainerState,
    _set_aside,
    prune_checkpoints,
    step_tag,
)
from megatron_tinyllama.checkpoint.weights import ReplicaDriftError, check_tp_replicas, param_shape
from megatron_tinyllama.config import JobConfig

logger = logging.getLogger(__name__)


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


def _replicated_fp32(engine) -> dict[str, torch.Tensor]:
    """Full fp32 values of the parameters every TP rank holds whole (norm gains: small), for
    :func:`check_tp_replicas`. Collective over the data-parallel group."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in engine.module.named_parameters():
        if getattr(param, "tensor_model_parallel", False):
            continue
        if param.requires_grad and (hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")):
            value = safe_get_full_fp32_param(param)
        else:
            value = param.data
        out[name] = value.detach().float().cpu().reshape(param_shape(param)).clone()
    return out


class CheckpointSaver:
    """Saves training checkpoints, in the background: one copy, one file per rank, no read-back.

    ``save`` waits for the save before it, copies what this rank holds to host memory (the only
    time training waits), and hands the write to a thread: every rank writes its own file through
    torch.distributed.checkpoint (checkpoint.sharded) on a gloo group of its own, digests taken
    as the bytes go out; then rank 0 writes ``manifest.json`` from what the writers reported,
    ``trainer_state.json`` (the checkpoint is complete) and ``latest``, and prunes. A crash before
    that leaves an incomplete directory and ``latest`` on the previous checkpoint. ``wait``
    returns when the last save is durable and raises its error on every rank.
    """

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[Future] = None
        self._group = None
        self._staging: Optional[torch.Tensor] = None  # the rank's share in host memory, reused
        self.last_staging_bytes = 0
        self.last_staging_seconds = 0.0

    def _process_group(self):
        # DCP's planning and the writers' report are collectives: a group of their own, so that
        # a background save never interleaves with the training step's collectives (gloo: the
        # staged tensors live in host memory whatever the training backend is).
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def save(self, engine, cfg: JobConfig, state: TrainerState, *, last: bool = False) -> Path:
        """Start saving ``state`` with the engine's current weights and moments. Collective.

        ``last``: the process ends after it (the end of the run, a stop or pre-emption): written
        now from the engine's own tensors, without the staging copy (a first save would map the
        rank's share of host memory for nothing: at 483M, 11 s of the 30 that DeepSpeed's launcher
        leaves a pre-empted rank); returns when durable.

        Raises:
            ReplicaDriftError: TP-replicated parameters differ (nothing of this checkpoint is
                marked complete).
            CheckpointWriteError / CheckpointError: the previous save failed (see :meth:`wait`).
        """
        from megatron.core import parallel_state

        from megatron_tinyllama.checkpoint.engine_state import held_ranges, rng_blob, shapes_blob, stage
        from megatron_tinyllama.checkpoint.reshard import _link_fragments

        self.wait()
        clock = time.perf_counter()
        save_dir = Path(cfg.checkpoint.save_dir)
        tag = step_tag(state.step)
        tag_dir = save_dir / tag
        rank = dist.get_rank()
        group = self._process_group()
        if rank == 0:
            _clear_tag_dir(tag_dir)
        dist.barrier(group=group)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            check_tp_replicas(engine, _replicated_fp32(engine), cfg.checkpoint.tp_replica_tolerance)
        step = adam_step(engine)
        if step:
            _link_fragments(engine)  # DeepSpeed links ZeRO-1/2 moment fragments lazily
        background = self.background and not last
        if background:  # training goes on while the write runs: it writes copies
            staged, self._staging = stage(held_ranges(engine, step), self._staging)
            self.last_staging_bytes = self._staging.numel() * self._staging.element_size()
        else:  # written before training goes on: the engine's own tensors, a piece at a time
            staged, self.last_staging_bytes = held_ranges(engine, step), 0
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        blobs = {rng_key(rank): rng_blob(), shapes_key(tp_rank, tp_size): shapes_blob(engine)}
        payload = None
        if rank == 0:
            payload = {**asdict(state), "checkpoint_format": PER_RANK_FORMAT, "adam_step": step, "config": cfg.to_dict(),
                       "world_size": dist.get_world_size(), "layout": engine_layout(engine),
                       "tokenizer_fingerprint": file_fingerprint(cfg.data.tokenizer_model)}
        waited = self.last_staging_seconds = time.perf_counter() - clock
        logger.info("checkpoint %s: staged %s bytes of this rank's state in %.2f s; writing %s", tag,
                    f"{self.last_staging_bytes:,}", waited, "in the background" if background else "now")
        keep, run_id = cfg.checkpoint.keep_last, state.run_id

        def write() -> Path:
            began = time.perf_counter()
            files = save_ranges(tag_dir, staged, blobs, process_group=group)
            staged.clear()
            try:
                if rank == 0:
                    write_atomic(tag_dir / MANIFEST, manifest_json(files))
                    write_atomic(tag_dir / TRAINER_STATE, json.dumps(payload, indent=2))
                    write_atomic(save_dir / "latest", tag)
                    prune_checkpoints(save_dir, keep=keep, run_id=run_id, current=tag)
                    logger.info("saved checkpoint %s: %s bytes in %d files; training waited %.2f s, the "
                                "write took %.1f s%s", tag_dir, f"{sum(f['bytes'] for f in files.values()):,}",
                                len(files), waited, time.perf_counter() - began,
                                " in the background" if background else "")
            finally:
                # Every rank's save ends when 'latest' names it; a failure on rank 0 here still
                # releases the others (its error reaches its own wait(), and the job ends there).
                dist.barrier(group=group)
            return tag_dir

        if not background:
            self._pending = Future()
            try:
                self._pending.set_result(write())
            except BaseException as err:  # noqa: BLE001 - raised by wait() below, named
                self._pending.set_exception(err)
            self.wait()
            return tag_dir
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-save")
        self._pending = self._executor.submit(write)
        return tag_dir

    def wait(self) -> Optional[Path]:
        """Block until the last save is durable (``latest`` names it); None when none is pending.

        Raises:
            CheckpointWriteError: a file could not be written (the file and errno named).
            CheckpointError: the save failed otherwise.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            return pending.result()
        except BaseException as err:  # noqa: BLE001
            inner = first_failure(err)
            if isinstance(inner, (CheckpointWriteError, ReplicaDriftError)):
                raise inner from err
            raise CheckpointError(f"saving a checkpoint failed: {type(inner).__name__}: {inner}") from err

    def close(self) -> None:
        """Wait for a pending save (errors logged, not raised: the run is ending anyway)."""
        try:
            self.wait()
        except Exception as err:  # noqa: BLE001
            logger.error("the last checkpoint save failed: %s", err)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def save_training_checkpoint(engine, cfg: JobConfig, state: TrainerState) -> Path:
    """Save everything for an exact resume, then point ``latest`` at it; returns when durable.
    Collective: all ranks. (The training loop saves in the background: :class:`CheckpointSaver`.)

    Raises:
        ReplicaDriftError: TP-replicated parameters differ (the checkpoint is left incomplete).
        CheckpointWriteError: a file could not be written (named, with the errno: ``ENOSPC`` for a
            full disk); ``latest`` and earlier checkpoints are untouched and this one stays
            incomplete.
    """
    saver = CheckpointSaver(background=False)
    try:
        return saver.save(engine, cfg, state)
    finally:
        saver.close()


