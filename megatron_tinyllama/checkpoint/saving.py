"""Saving training checkpoints: in the background, one copy, one file per rank.

This module owns the save of a training checkpoint (checkpoint.training owns the layout of the
save_dir, retention and where a run starts; checkpoint.sharded the bytes): what a rank stages,
the background write and its completion (the manifest from the writers, ``trainer_state.json``,
``latest``, retention), the save a stop signal starts at once (:meth:`CheckpointSaver.save_at_signal`),
and the errors a save can end in.

Every save begins, on the saver's own gloo group, with an agreement: the ranks compare the step
they are about to write (two 8-byte all-reduces). A save started by a signal is one rank's own
decision, made in its signal handler, so its peers may meet it with their next ordinary save, a
step later: the agreement pairs them, a mismatch is retried rather than written, and no rank ever
writes a checkpoint its peers do not.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

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


RETRY = "retry"  # a save attempt whose peers were at another step: nothing written, tried again
SKIP = "skip"    # a stop's save not written: every rank already holds the step before it, saved at the signal


def _agree_on_save(group, step: int, durable: int, signal_saved: bool, may_skip: bool,
                   holding: Callable[[], bool]) -> str:
    """The ranks' agreement before a save writes (collective over ``group``): "write", RETRY when
    the ranks are at different steps or one of them can no longer hold its tensors still, SKIP
    when the save may be skipped and every rank's last durable checkpoint is the step before this
    one, made at a signal. Decided from all-reduced values only, so every rank decides alike."""
    facts = torch.tensor([step, -step, durable, -durable, int(signal_saved), -int(may_skip)], dtype=torch.int64)
    dist.all_reduce(facts, op=dist.ReduceOp.MAX, group=group)
    max_step, min_step = int(facts[0]), -int(facts[1])
    max_durable, min_durable = int(facts[2]), -int(facts[3])
    ok = torch.tensor([int(max_step == min_step and holding())], dtype=torch.int64)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if not int(ok):
        return RETRY
    if int(facts[5]) == -1 and int(facts[4]) and max_durable == min_durable == step - 1:
        return SKIP
    return "write"


class _SignalHold:
    """The handshake between a save started at a signal (written from the engine's own tensors,
    in the background) and the training step it overlaps: the step's update waits while the save
    may still write; if the peers do not join in time the step goes on and the save gives way."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.cond = threading.Condition()
        self.committed = False  # the agreement reached: the update waits until ``done``
        self.gave_up = False    # the update went on first: this save must not write
        self.done = False

    def commit(self) -> bool:
        with self.cond:
            if self.gave_up:
                return False
            self.committed = True
            return True

    def finish(self) -> None:
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def before_update(self, wait_seconds: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.committed or self.done, timeout=wait_seconds)
            if self.committed:
                self.cond.wait_for(lambda: self.done)
            elif not self.done:
                self.gave_up = True


class CheckpointSaver:
    """Saves training checkpoints, in the background: one copy, one file per rank, no read-back.

    ``save`` waits for the save before it, copies what this rank holds to host memory (the only
    time training waits), and hands the write to a thread: every rank writes its own file through
    torch.distributed.checkpoint (checkpoint.sharded) on a gloo group of its own, digests taken
    as the bytes go out; then rank 0 writes ``manifest.json`` from what the writers reported,
    ``trainer_state.json`` (the checkpoint is complete) and ``latest``, and prunes. A crash before
    that leaves an incomplete directory and ``latest`` on the previous checkpoint. ``wait``
    returns when the last save is durable and raises its error on every rank.

    A stop signal (pre-emption) starts a save of the last completed step at once
    (:meth:`save_at_signal`), beside the step in flight, so a pre-empted job's checkpoint does not
    wait for the rest of a long step: the step's update waits for that write (:meth:`update`).
    Why hand-written: DCP's ``async_save`` stages on the caller's thread and needs its peers in
    step; a signal reaches each rank at a different point of its step, so the ranks first agree
    on the step they write (:func:`_agree_on_save`).
    """

    HOLD_SECONDS = 5.0
    """How long an update waits for its peers to join a save started at a signal (a peer not
    signalled joins only at its next save: the update then goes on and the stop's save follows)."""

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[Future] = None
        self._group = None
        self._staging: Optional[torch.Tensor] = None  # the rank's share in host memory, reused
        self.last_staging_bytes = 0
        self.last_staging_seconds = 0.0
        self.durable_step = -1     # the step of this rank's last durable save
        self.signal_saved = False  # ... and whether a signal started it
        self._claimed_step = -1    # the step of the save in flight or done last (one save per step)
        self._busy = 0             # the main thread is in a save or an update: a signal starts nothing
        self._snapshot = None      # (engine, cfg, TrainerState, rng blob) of the last completed step
        self._signal: Optional[_SignalHold] = None
        self._signal_wanted = False  # a signal came while no save could start: the next step starts it

    def _process_group(self):
        # DCP's planning and the writers' report are collectives: a group of their own, so that
        # a background save never interleaves with the training step's collectives (gloo: the
        # staged tensors live in host memory whatever the training backend is).
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _executor_thread(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-save")
        return self._executor

    # -- the step's side ----------------------------------------------------------------------

    def note_step(self, engine, cfg: JobConfig, state: TrainerState, *, saved: bool = False) -> None:
        """Remember the last completed step (its counters and RNG state: what a save at a signal
        writes beside the next step); ``saved``: a checkpoint of it exists (a resume's start)."""
        from megatron_tinyllama.checkpoint.engine_state import rng_blob

        self._process_group()
        self._executor_thread()  # made here, not in a signal handler
        self._snapshot = (engine, cfg, copy.deepcopy(state), rng_blob())
        if saved:
            self.durable_step = self._claimed_step = state.step
        if self._signal_wanted and self._signal is None:
            self.save_at_signal()

    @contextlib.contextmanager
    def _busy_here(self):
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    @contextlib.contextmanager
    def update(self):
        """Context for the optimizer's update: it waits while a save started at a signal may
        still write the weights and moments it is about to change. From here until the next
        :meth:`note_step` the engine is past the last noted step: a signal starts no save."""
        with self._busy_here():
            self._snapshot = None
            if self._signal is not None and not self._signal.done:
                self._signal.before_update(self.HOLD_SECONDS)
            yield

    def save_at_signal(self) -> bool:
        """Start saving the last completed step now, from a signal handler (the main thread,
        anywhere in a step): the engine's own tensors, written in the background while the step
        goes on; its update waits for the write. Inside a save or an update it starts when the
        step is noted (:meth:`note_step`); never before the first step, for a step already saved,
        or twice. Returns whether a save was started."""
        self._signal_wanted = True
        if self._busy or self._snapshot is None or self._signal is not None:
            return False
        engine, cfg, state, rng = self._snapshot
        if state.step <= self._claimed_step or not cfg.checkpoint.save_dir:
            return False
        self._signal = _SignalHold(state.step)
        self._start(engine, cfg, state, rng=rng, kind="signal")
        logger.warning("checkpoint %s: saving the last completed step now, beside the step in flight",
                       step_tag(state.step))
        return True

    # -- saves ----------------------------------------------------------------------------------

    def save(self, engine, cfg: JobConfig, state: TrainerState, *, last: bool = False,
             may_skip: bool = False) -> Optional[Path]:
        """Start saving ``state`` with the engine's current weights and moments. Collective.

        ``last``: the process ends after it (the end of the run, a stop or pre-emption): written
        now from the engine's own tensors, without the staging copy (a first save would map the
        rank's share of host memory for nothing: at 483M, 11 s of the 30 that DeepSpeed's launcher
        leaves a pre-empted rank); returns when durable. ``may_skip`` (a stop): not written when
        every rank already holds the step before, saved at the signal; returns None then.

        Raises:
            ReplicaDriftError: TP-replicated parameters differ (nothing of this checkpoint is
                marked complete).
            CheckpointWriteError / CheckpointError: the previous save failed (see :meth:`wait`).
        """
        from megatron.core import parallel_state

        with self._busy_here():
            self.wait()
            if parallel_state.get_tensor_model_parallel_world_size() > 1:  # the step's group: every rank
                check_tp_replicas(engine, _replicated_fp32(engine), cfg.checkpoint.tp_replica_tolerance)
            if state.step <= self._claimed_step:  # a signal's save of this step came first
                self.wait()
                return Path(cfg.checkpoint.save_dir) / step_tag(self.durable_step)
            kind = "last" if (last or not self.background) else "background"
            tag_dir = self._start(engine, cfg, state, kind=kind, may_skip=may_skip)
            if kind != "background":
                written = self.wait()
                return None if written is SKIP else tag_dir
            return tag_dir

    def _start(self, engine, cfg: JobConfig, state: TrainerState, *, kind: str, rng: Optional[bytes] = None,
               may_skip: bool = False) -> Path:
        """What this rank holds, its counters and RNG state, gathered on the calling (main)
        thread without communication; the agreement and the write on the saver's thread (or here
        for ``kind`` "last")."""
        from megatron.core import parallel_state

        from megatron_tinyllama.checkpoint.engine_state import held_ranges, rng_blob, shapes_blob, stage
        from megatron_tinyllama.checkpoint.reshard import _link_fragments

        clock = time.perf_counter()
        save_dir = Path(cfg.checkpoint.save_dir)
        tag = step_tag(state.step)
        tag_dir = save_dir / tag
        rank = dist.get_rank()
        group = self._process_group()
        self._claimed_step = state.step
        step = adam_step(engine)
        if step:
            _link_fragments(engine)  # DeepSpeed links ZeRO-1/2 moment fragments lazily
        if kind == "background":  # training goes on while the write runs: it writes copies
            staged, self._staging = stage(held_ranges(engine, step), self._staging)
            self.last_staging_bytes = self._staging.numel() * self._staging.element_size()
        else:  # the engine's own tensors, a piece at a time: nothing changes them while written
            staged, self.last_staging_bytes = held_ranges(engine, step), 0
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        blobs = {rng_key(rank): rng if rng is not None else rng_blob(), shapes_key(tp_rank, tp_size): shapes_blob(engine)}
        payload = None
        if rank == 0:
            payload = {**asdict(state), "checkpoint_format": PER_RANK_FORMAT, "adam_step": step, "config": cfg.to_dict(),
                       "world_size": dist.get_world_size(), "layout": engine_layout(engine),
                       "tokenizer_fingerprint": file_fingerprint(cfg.data.tokenizer_model)}
        waited = self.last_staging_seconds = time.perf_counter() - clock
        if kind == "background":
            logger.info("checkpoint %s: staged %s bytes of this rank's state in %.2f s; writing in the "
                        "background", tag, f"{self.last_staging_bytes:,}", waited)
        keep, run_id = cfg.checkpoint.keep_last, state.run_id
        hold = self._signal if kind == "signal" else None

        def write():
            began = time.perf_counter()
            for _ in range(3):  # a peer's save at a signal is met once: one retry at most
                decision = _agree_on_save(group, state.step, self.durable_step, self.signal_saved, may_skip,
                                          hold.commit if hold else (lambda: True))
                if decision != RETRY or hold is not None:
                    break
            else:
                raise CheckpointError(f"the ranks did not agree on the step of checkpoint {tag}")
            if decision == SKIP:
                logger.info("checkpoint %s not written: every rank holds step %d, saved at the signal",
                            tag, self.durable_step)
            elif decision == "write" and kind == "last":
                logger.info("checkpoint %s: writing this rank's state now", tag)
            if decision != "write":
                staged.clear()
                if decision == RETRY:  # nothing written; this step is saved again, by the next save
                    self._claimed_step = self.durable_step
                return decision
            if rank == 0:
                _clear_tag_dir(tag_dir)
            dist.barrier(group=group)
            files = save_ranges(tag_dir, staged, blobs, process_group=group)
            staged.clear()
            try:
                if rank == 0:
                    write_atomic(tag_dir / MANIFEST, manifest_json(files))
                    write_atomic(tag_dir / TRAINER_STATE, json.dumps(payload, indent=2))
                    write_atomic(save_dir / "latest", tag)
                    prune_checkpoints(save_dir, keep=keep, run_id=run_id, current=tag)
                    how = {"background": " in the background", "signal": " beside the step in flight"}.get(kind, "")
                    logger.info("saved checkpoint %s: %s bytes in %d files; training waited %.2f s, the "
                                "write took %.1f s%s", tag_dir, f"{sum(f['bytes'] for f in files.values()):,}",
                                len(files), waited, time.perf_counter() - began, how)
            finally:
                # Every rank's save ends when 'latest' names it; a failure on rank 0 here still
                # releases the others (its error reaches its own wait(), and the job ends there).
                dist.barrier(group=group)
            self.durable_step, self.signal_saved = state.step, kind == "signal"
            return tag_dir

        def write_then_release():
            try:
                return write()
            finally:
                if hold is not None:
                    hold.finish()

        if kind == "last":
            self._pending = Future()
            try:
                self._pending.set_result(write())
            except BaseException as err:  # noqa: BLE001 - raised by wait(), named
                self._pending.set_exception(err)
            return tag_dir
        self._pending = self._executor_thread().submit(write_then_release)
        return tag_dir

    def wait(self):
        """Block until the last save is durable (``latest`` names it); returns its directory,
        None when none is pending, :data:`SKIP` or :data:`RETRY` for a save agreed not to write.

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


