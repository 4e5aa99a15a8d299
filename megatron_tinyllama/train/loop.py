"""The training loop: ``train(cfg)`` sets everything up, ``train_step`` runs one optimizer step.

Data flows one way: config -> process groups -> engine (model + optimizer under ZeRO-3) -> batches
-> steps -> checkpoints and metrics. A step with a NaN/inf loss on any rank is skipped (DeepSpeed
sees a non-finite gradient norm and discards the update) and counted; ``max_consecutive_nonfinite``
such steps in a row halt the run with :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_tinyllama.checkpoint.lock import lock_save_dir
from megatron_tinyllama.checkpoint.saving import CheckpointSaver
from megatron_tinyllama.checkpoint.training import (
    TrainerState,
    plan_start,
    start_state,
    step_tag,
)
from megatron_tinyllama.config import ConfigError, JobConfig, save_config
from megatron_tinyllama.data.provenance import check_data_vocab
from megatron_tinyllama.elastic import record_world
from megatron_tinyllama.engine.engine import TrainingEngine, build_engine
from megatron_tinyllama.model.build import forward_logits, language_model_loss
from megatron_tinyllama.parallel.init import (
    connect_rendezvous_store,
    initialize_distributed,
    initialize_model_parallel,
)
from megatron_tinyllama.train.forecast_live import LiveForecast
from megatron_tinyllama.train.stop_relay import StopRelay, agreed_relay_key, interrupt_main_thread
from megatron_tinyllama.train.metrics import MetricsWriter, RunStart, output_problems
from megatron_tinyllama.train.schedule import learning_rate
from megatron_tinyllama.train.watchdog import LauncherWatch, StallWatchdog

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN or infinite loss."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    finite: bool
    stop: bool = False
    """A rank was asked to stop (:class:`StopRequest`): checkpoint and return after this step."""


@dataclass
class TrainResult:
    state: TrainerState
    losses: list[float] = field(default_factory=list)
    """Mean training loss of every step this process ran (NaN for skipped steps)."""
    valid_losses: list[float] = field(default_factory=list)
    applied_updates: int = 0
    """Optimizer updates applied by this process's run (excludes skipped steps)."""
    stopped: Optional[str] = None
    """Why the run stopped before train.train_tokens (a checkpoint of the last step was saved,
    or of the step before: ``resume_step``)."""
    resume_step: Optional[int] = None
    """Set when a stop's checkpoint is the step before the last (saved at the signal, beside the
    step that was in flight): the step a resume starts from."""


def _all_reduce_mean(value: float, group=None) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    if torch.cuda.is_available():
        tensor = tensor.cuda()
    dist.all_reduce(tensor, group=group)
    return tensor.item() / dist.get_world_size(group)


# Why a rank asks the run to stop, as it travels in the step's all-reduce (the highest wins).
STOP_KINDS = {1: "the time limit (train.stop_after_minutes)", 2: "a signal", 3: "its launcher is gone"}


def _agree(finite: bool, stop_kind: int) -> tuple[bool, Optional[tuple[int, int]]]:
    """(finite on every rank, (the lowest rank asking to stop, why) or None), in the one
    all-reduce per step. A rank's request is sent as ``world - rank`` so MAX finds the lowest."""
    world, rank = dist.get_world_size(), dist.get_rank()
    tensor = torch.tensor([0 if finite else 1, world - rank if stop_kind else 0, stop_kind], dtype=torch.int32)
    if torch.cuda.is_available():
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    not_finite, asker, kind = tensor.tolist()
    return not_finite == 0, ((world - asker, kind) if asker else None)


def stop_kind(stop: Optional["StopRequest"]) -> int:
    """This rank's reason to stop as a :data:`STOP_KINDS` code (0: none)."""
    if stop is None or not stop.requested:
        return 0
    if stop.reason.startswith("a stop request from rank"):  # a peer's, relayed: the peer says it
        return 0
    if stop.reason.startswith("signal"):
        return 2
    return 1 if "stop_after_minutes" in stop.reason else 3


class StopRequest:
    """A signal (SIGUSR1 or SIGTERM), ``train.stop_after_minutes`` or the end of the launcher that
    started this rank (:class:`~megatron_tinyllama.train.watchdog.LauncherWatch`) asks the run to
    stop.

    The run then finishes the current step, saves a checkpoint and returns, to be resumed by the
    same command: how a job ends cleanly before preemption or the end of its allocation. One rank
    receiving the signal is enough; the ranks agree in the step's existing all-reduce. A signal
    also starts the save of the last completed step at once (``on_signal``), and is passed to the
    other ranks through the rendezvous store (train.stop_relay), which start theirs: a scheduler's
    30 s are not spent waiting for the end of the step. A second signal acts as it would without
    this (a hung rank can still be killed).
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, stop_after_minutes: Optional[float] = None,
                 launcher: Optional[LauncherWatch] = None,
                 relay: Optional[Callable[["StopRequest"], StopRelay]] = None) -> None:
        self.reason: Optional[str] = None
        self._relay = relay(self) if relay is not None else None
        self._relayed: Optional[str] = None  # a peer's stop, set by the relay's thread
        self.on_signal: Optional[Callable[[], object]] = None
        """Called in the handler at the first signal: starts the save of the last completed step
        (checkpoint.saving.CheckpointSaver.save_at_signal) beside the step in flight."""
        self._signalled = False
        self._launcher = launcher
        self._deadline = (time.monotonic() + 60 * stop_after_minutes) if stop_after_minutes else None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            if self._relay is not None:
                self._relay.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._relay is not None:
            self._relay.close()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def relayed(self, reason: str) -> None:
        """A peer's stop (train.stop_relay's thread): handled in the main thread as a signal
        that does not count as this rank's own."""
        self._relayed = reason
        interrupt_main_thread(signal.SIGUSR1)

    def _on_signal(self, signum, frame) -> None:
        # Signalled twice: stop now, as the signal would have without us. (A stop already agreed
        # with another rank is not a signal: a scheduler signals every rank, and this rank's
        # handler may run only after the step's all-reduce told it.)
        if self._relayed is not None and signum == signal.SIGUSR1:  # a peer's, through the relay
            relayed, self._relayed = self._relayed, None
            if self.reason is None:
                self.reason = relayed
            logger.warning("%s: stopping after this step with a checkpoint", relayed)
            if self.on_signal is not None:
                self.on_signal()
            return
        if self._signalled:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self._signalled = True
        if self.reason is None or self.reason.startswith("a stop request from rank"):  # its own, first
            self.reason = f"signal {signal.Signals(signum).name}"
        logger.warning("signal %s: stopping after this step with a checkpoint (send it again to stop now)",
                       signal.Signals(signum).name)
        if self._relay is not None:
            self._relay.announce(STOP_KINDS[2])
        if self.on_signal is not None:
            self.on_signal()

    @property
    def requested(self) -> bool:
        if self.reason is None and self._launcher is not None and self._launcher.reason:
            self.reason = self._launcher.reason
        if self.reason is None and self._deadline is not None and time.monotonic() >= self._deadline:
            self.reason = "train.stop_after_minutes reached"
        return self.reason is not None


def _to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if torch.cuda.is_available():
        return {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    return batch


def compute_loss(te: TrainingEngine, cfg: JobConfig, batch: dict[str, torch.Tensor]):
    """Forward one micro-batch through the DeepSpeed engine; returns (loss, metrics)."""
    logits = forward_logits(te.engine, batch["tokens"])
    return language_model_loss(logits, batch["labels"], batch["loss_mask"], cfg.model.z_loss_weight,
                               vocab_size=cfg.model.vocab_size, backend=te.kernels.cross_entropy)


def train_step(te: TrainingEngine, cfg: JobConfig, batches: Iterator[dict], lr: float,
               stop: Optional[StopRequest] = None, saver: Optional[CheckpointSaver] = None) -> StepResult:
    """Run one optimizer step of ``gradient_accumulation_steps`` micro-batches (collective).
    ``saver``: its :meth:`~CheckpointSaver.update` guards the update (a save started at a signal
    writes the weights and moments the update changes)."""
    from megatron.core import parallel_state

    for group in te.engine.optimizer.param_groups:
        group["lr"] = lr
    # Accumulate on the device and synchronise once per step, not once per micro-batch.
    loss_sum = None
    finite_all = None
    for _ in range(te.geometry.gradient_accumulation_steps):
        batch = _to_device(next(batches))
        loss, metrics = compute_loss(te, cfg, batch)
        finite_now = torch.isfinite(loss.detach())
        finite_all = finite_now if finite_all is None else finite_all & finite_now
        te.engine.backward(loss)
        update = saver is not None and te.engine.is_gradient_accumulation_boundary()
        with saver.update() if update else contextlib.nullcontext():
            te.engine.step()
        loss_sum = metrics["lm_loss"] if loss_sum is None else loss_sum + metrics["lm_loss"]
    finite, asked = _agree(bool(finite_all.item()), stop_kind(stop))
    stop_now = asked is not None
    if asked is not None and stop is not None and stop.reason is None:
        # Said once, on the ranks that were not asked: which rank asked, on which node, and why.
        from megatron_tinyllama.parallel.init import read_launcher_env

        stop.reason = (f"a stop request from rank {asked[0]} (node {read_launcher_env().node_of(asked[0])}): "
                       f"{STOP_KINDS.get(asked[1], 'a request')}")
    grad_norm = te.engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    mean_loss = _all_reduce_mean(loss_sum.item() / te.geometry.gradient_accumulation_steps,
                                 parallel_state.get_data_parallel_group())
    return StepResult(loss=mean_loss, grad_norm=grad_norm, finite=finite and math.isfinite(grad_norm),
                      stop=stop_now)


@torch.no_grad()
def evaluate(te: TrainingEngine, cfg: JobConfig) -> Optional[float]:
    """Mean validation loss over ``logging.eval_tokens`` held-out tokens (collective)."""
    from megatron.core import parallel_state

    from megatron_tinyllama.data.loader import build_valid_batches

    if not cfg.data.valid_blend:
        return None
    dp_size = parallel_state.get_data_parallel_world_size()
    per_pass = cfg.train.micro_batch_size * dp_size
    num_samples = max(per_pass, cfg.logging.eval_tokens // cfg.model.seq_length // per_pass * per_pass)
    batches = build_valid_batches(
        cfg.data, seq_length=cfg.model.seq_length, micro_batch_size=cfg.train.micro_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(), dp_size=dp_size, num_samples=num_samples,
        seed=_data_seed(cfg), vocab_size=cfg.model.vocab_size,
    )
    te.engine.eval()
    # Summed on the device, read once at the end: an .item() per batch would make the host wait
    # for each batch's kernels before queuing the next one.
    total = torch.zeros(1, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    count = 0
    for batch in batches:
        batch = _to_device(batch)
        _, metrics = compute_loss(te, cfg, batch)
        total += metrics["lm_loss"].detach().to(torch.float64)
        count += 1
    te.engine.train()
    group = parallel_state.get_data_parallel_group()
    total /= max(1, count)
    dist.all_reduce(total, group=group)
    return total.item() / dist.get_world_size(group)


def _data_seed(cfg: JobConfig) -> int:
    return cfg.data.seed if cfg.data.seed is not None else cfg.parallel.seed


def stage_data_config(data_cfg, state: TrainerState, seq_length: int):
    """``data_cfg`` with an unset mixture warm-up start placed where this stage started."""
    import dataclasses

    warmup = data_cfg.mixture_warmup
    if warmup is None or warmup.start_tokens is not None:
        return data_cfg
    start = dataclasses.replace(warmup, start_tokens=state.stage_start_samples * seq_length)
    return dataclasses.replace(data_cfg, mixture_warmup=start)


def applied_updates(te: TrainingEngine) -> int:
    """Optimizer updates actually applied (skipped steps excluded), from AdamW's own step count."""
    inner = getattr(te.engine.optimizer, "optimizer", te.engine.optimizer)
    steps = [state["step"] for state in inner.state.values() if "step" in state]
    return int(max(steps)) if steps else 0


def _check_outputs(cfg: JobConfig) -> None:
    """Every rank checks the folders it will write; all refuse alike if any rank cannot (collective).

    Raises:
        ConfigError: naming each rank, field and folder that failed.
    """
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, output_problems(cfg, dist.get_rank()))
    problems = [f"rank {rank}: {problem}" for rank, mine in enumerate(gathered) for problem in mine]
    if problems:
        raise ConfigError("; ".join(problems))


def train(cfg: JobConfig, *, batch_source: Optional[Callable[..., Iterator[dict]]] = None,
          launcher_watch: Optional[LauncherWatch] = None) -> TrainResult:
    """Run (or resume) the job described by ``cfg`` on the current process group.

    Args:
        cfg: the resolved recipe.
        batch_source: replaces :func:`megatron_tinyllama.data.loader.build_train_batches` (same
            signature); tests use it to feed synthetic batches.
        launcher_watch: started by the entry point; when its launcher is gone the run stops
            after the step with a checkpoint, as on SIGTERM.
    """
    if batch_source is None:
        from megatron_tinyllama.data.loader import build_train_batches as batch_source
        from megatron_tinyllama.data.loader import check_datasets_exist

        check_datasets_exist(cfg.data)
        check_data_vocab(cfg.data, cfg.model.vocab_size)

    env = initialize_distributed()
    initialize_model_parallel(cfg.parallel.tensor_parallel_size, cfg.parallel.seed)
    _check_outputs(cfg)  # before the lock file is written into save_dir
    # Before the save_dir is read: a second job on it is refused here, naming the holder.
    lock = lock_save_dir(cfg.checkpoint.save_dir)
    try:
        return _train_holding_save_dir(cfg, env, batch_source, launcher_watch)
    finally:
        lock.release()


def _train_holding_save_dir(cfg: JobConfig, env, batch_source,
                            launcher_watch: Optional[LauncherWatch]) -> TrainResult:
    from megatron.core import parallel_state

    plan = plan_start(cfg, dist.get_world_size(), env.local_world_size)  # refuses a misfit, early
    te = build_engine(cfg, env)
    state = start_state(te.engine, cfg, plan)
    if cfg.checkpoint.save_dir and dist.get_rank() == 0:
        Path(cfg.checkpoint.save_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.checkpoint.save_dir) / "config.yaml")
    seq = cfg.model.seq_length
    batch_tokens = te.geometry.global_batch_size * seq
    batches = batch_source(
        stage_data_config(cfg.data, state, seq), seq_length=seq, micro_batch_size=cfg.train.micro_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
        consumed_samples=state.consumed_samples, seed=_data_seed(cfg),
        global_batch_size_at=te.geometry.global_batch_size,
        num_samples=state.samples_needed(cfg, te.geometry.global_batch_size), vocab_size=cfg.model.vocab_size,
    )
    resumed_from = str(Path(cfg.checkpoint.save_dir) / step_tag(state.step)) if plan.kind == "resume" else None
    metrics = MetricsWriter(cfg, dist.get_rank(), dist.get_world_size(),
                            start=RunStart(plan.kind, state.step, state.consumed_tokens, resumed_from))
    # Under torchrun's elastic agent: a line and a metrics event naming each world change (collective).
    record_world(cfg.checkpoint.save_dir, resumed_step=state.step, resumed_from=resumed_from, metrics=metrics)
    # Rank 0 alone forecasts: the validation loss is already the same on every rank.
    live = (LiveForecast.for_run(cfg, state.consumed_tokens)
            if cfg.logging.forecast and cfg.data.valid_blend and metrics.enabled else None)
    result = TrainResult(state=state)
    saver = CheckpointSaver(background=cfg.checkpoint.background_save)
    if cfg.checkpoint.save_dir and state.step:
        saver.note_step(te.engine, cfg, state, saved=plan.kind == "resume")
    consecutive_bad = 0
    stall = cfg.train.stall_timeout_minutes
    watchdog = StallWatchdog(stall and 60 * stall, dist.get_rank(), dist.get_world_size(),
                             connect_rendezvous_store)
    try:
        key = agreed_relay_key() if dist.get_world_size() > 1 else ""
        relay = lambda stop: StopRelay(dist.get_rank(), connect_rendezvous_store, stop.relayed, key)  # noqa: E731
        with StopRequest(cfg.train.stop_after_minutes, launcher_watch,
                         relay if dist.get_world_size() > 1 else None) as stop, watchdog:
            if cfg.checkpoint.save_dir:
                stop.on_signal = saver.save_at_signal
            while state.consumed_tokens < cfg.train.train_tokens:
                lr = learning_rate(state.consumed_tokens + batch_tokens, cfg.optimizer, cfg.train.train_tokens)
                watchdog.progress(state.step + 1, "step")
                step = train_step(te, cfg, batches, lr, stop, saver if cfg.checkpoint.save_dir else None)
                state.step += 1
                state.consumed_samples += te.geometry.global_batch_size
                state.consumed_tokens += batch_tokens
                if cfg.checkpoint.save_dir:
                    saver.note_step(te.engine, cfg, state)
                metrics.count_tokens(batch_tokens)
                if step.finite:
                    consecutive_bad = 0
                    result.losses.append(step.loss)
                else:
                    consecutive_bad += 1
                    state.skipped_steps += 1
                    result.losses.append(float("nan"))
                    logger.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                                   state.step, consecutive_bad)
                    if consecutive_bad >= cfg.train.max_consecutive_nonfinite:
                        raise NonFiniteLossError(
                            f"halted at step {state.step} (tokens {state.consumed_tokens:,}): "
                            f"{consecutive_bad} consecutive steps with a non-finite loss "
                            f"(train.max_consecutive_nonfinite={cfg.train.max_consecutive_nonfinite}); "
                            "resume from the last checkpoint with a lower optimizer.lr or check the data"
                        )
                done = state.consumed_tokens >= cfg.train.train_tokens
                if state.step % cfg.logging.log_interval_steps == 0 or done or step.stop:
                    metrics.log_train(state.step, {
                        "train_loss": step.loss, "lr": lr, "grad_norm": step.grad_norm,
                        "tokens": state.consumed_tokens, "samples": state.consumed_samples,
                        "global_batch_size": te.geometry.global_batch_size,
                        "skipped_steps": state.skipped_steps,
                    })
                if cfg.data.valid_blend and (state.step % cfg.logging.eval_interval_steps == 0 or done):
                    watchdog.progress(state.step, "evaluation")
                    valid = evaluate(te, cfg)
                    result.valid_losses.append(valid)
                    check = live.observe(state.step, state.consumed_tokens, valid) if live else None
                    metrics.log_eval(state.step, state.consumed_tokens, valid, check.record() if check else None)
                if cfg.checkpoint.save_dir and (
                    state.step % cfg.checkpoint.save_interval_steps == 0 or step.stop
                    or (done and cfg.checkpoint.save_at_end)
                ):
                    watchdog.progress(state.step, "checkpoint save")
                    # The process ends after a stop or the last step: that save is written now,
                    # durable on return, without a staging copy; a stop's is skipped when a
                    # signal's save already holds the step before (this one is redone on resume).
                    saved = saver.save(te.engine, cfg, state, last=step.stop or done,
                                       may_skip=step.stop and not done)
                    if saved is None:
                        result.resume_step = saver.durable_step
                if step.stop and not done:
                    result.stopped = stop.reason
                    kept = ("" if not cfg.checkpoint.save_dir else
                            ", checkpoint saved" if result.resume_step is None else
                            f"; the checkpoint of step {result.resume_step}, saved at the signal, resumes "
                            f"(step {state.step} is redone)")
                    logger.warning("stopped at step %d (%s tokens) on %s%s; the same command resumes",
                                   state.step, f"{state.consumed_tokens:,}", result.stopped, kept)
                    break
        saver.wait()
        result.applied_updates = applied_updates(te)
    finally:
        saver.close()  # a save still in flight after an error finishes (it is a good checkpoint)
        metrics.close()
    return result
