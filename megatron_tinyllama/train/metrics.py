"""What the trainer reports: console lines, TensorBoard scalars and ``metrics.jsonl``, from rank 0.

Throughput is measured over each log interval. Model FLOPs per token follow the usual dense
transformer count (Megatron-LM / PaLM appendix B): 6 x non-embedding parameters for the matmuls
plus 12 x layers x hidden x seq for attention scores and values, forward and backward; activation
recomputation is not counted (so MFU is model FLOPs utilisation, not hardware).

:func:`output_problems` checks, before anything is built, that the folders a run writes (these
sinks and the checkpoints) can be created and written.

**Restarts.** A run killed after its last checkpoint has logged steps that its resume trains
again. When a run starts, the records of ``metrics.jsonl`` logged after the step it starts from
(and a line cut short by the kill) are moved to ``metrics.superseded.jsonl`` beside it, under a
header record naming the restart, and the file is rewritten atomically; nothing is deleted. A
resume then appends ``{"event": "resume", "step": N, "tokens": T, "checkpoint": TAG, ...}``, so
``metrics.jsonl`` holds each step once, in order, and says where the run restarted: plots and
the scaling fits (:mod:`megatron_tinyllama.scaling.runs`) read it as one run. TensorBoard is
told the same with ``purge_step``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_tinyllama.config import JobConfig, ModelConfig

logger = logging.getLogger(__name__)

# Dense bf16 peak of common accelerators (TFLOP/s), for MFU when the recipe does not give one.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10": 125.0, "L40": 181.0, "V100": 125.0}


def flops_per_token(model: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward)."""
    embedding = model.vocab_size * model.hidden_size
    non_embedding = model.num_parameters() - embedding  # output layer matmul counts, lookup does not
    return 6.0 * non_embedding + 12.0 * model.num_layers * model.hidden_size * model.seq_length


def peak_tflops(cfg: JobConfig) -> Optional[float]:
    if cfg.logging.peak_tflops_per_device:
        return cfg.logging.peak_tflops_per_device
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in _PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def _folder_problem(field: str, folder: str) -> Optional[str]:
    """Why ``folder`` cannot be created or written (one line naming ``field``), None when it can."""
    path = Path(folder)
    probe = path / f".write-check.{socket.gethostname()}.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        blocker = next((p for p in (path, *path.parents) if p.exists()), None)
        where = f" ({blocker} is a file)" if blocker is not None and not blocker.is_dir() else ""
        return f"{field}: cannot create or write {path}: {err.strerror or err}{where}"
    return None


def output_problems(cfg: JobConfig, rank: int) -> list[str]:
    """The output folders this rank will write that it cannot create or write, each named.

    Every rank writes its checkpoint shards into ``checkpoint.save_dir``; rank 0 also writes
    ``metrics.jsonl`` there and the TensorBoard events into ``logging.tensorboard_dir``. Checked
    before the engine is built, so the run stops at once and on every rank alike (after the
    engine, rank 0 died in ``SummaryWriter`` and its peers in gloo's "Connection closed").
    """
    folders = []
    if cfg.checkpoint.save_dir:
        folders.append(("checkpoint.save_dir", cfg.checkpoint.save_dir))
    if rank == 0 and cfg.logging.tensorboard_dir:
        folders.append(("logging.tensorboard_dir", cfg.logging.tensorboard_dir))
    return [problem for problem in (_folder_problem(f, d) for f, d in folders) if problem]


SUPERSEDED = "metrics.superseded.jsonl"


@dataclass(frozen=True)
class RunStart:
    """Where a run (re)started: the start plan's kind and the counters it trains on from."""

    kind: str
    """'resume', 'continue', 'init' or 'fresh' (:class:`~megatron_tinyllama.checkpoint.training.StartPlan`)."""
    step: int
    tokens: int
    checkpoint: Optional[str] = None
    """The checkpoint directory resumed from."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def supersede_records_after(path: Path, step: int, reason: str, seen: Optional[dict] = None) -> int:
    """Move the records of ``path`` logged after ``step``, and unreadable lines, aside.

    They are appended (and synced) to :data:`SUPERSEDED` beside ``path`` under a header record
    ``{"event": "superseded", "after_step": step, "reason": reason, ...}`` before ``path`` is
    replaced atomically by the records kept: a kill in between leaves a line in both files, never
    in neither.

    Args:
        seen: when given, ``seen["last_step"]`` is set to the highest step of a record moved
            (where the interrupted run had got to).

    Returns:
        How many lines were moved (0 leaves both files untouched).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, moved = [], []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # the kill cut the last line short
            moved.append(line)
            continue
        late = isinstance(record, dict) and isinstance(record.get("step"), (int, float)) and record["step"] > step
        (moved if late else kept).append(line)
        if late and seen is not None:
            seen["last_step"] = max(seen.get("last_step", step), int(record["step"]))
    if not moved:
        return 0
    header = json.dumps({"event": "superseded", "after_step": step, "reason": reason, "lines": len(moved),
                         "time": _now()})
    with open(path.with_name(SUPERSEDED), "a") as handle:
        handle.write("".join(f"{line}\n" for line in [header, *moved]))
        handle.flush()
        os.fsync(handle.fileno())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write("".join(f"{line}\n" for line in kept))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return len(moved)


class MetricsWriter:
    """Rank-0 sink for training metrics; a no-op object on other ranks.

    With ``start``, records after ``start.step`` left by an interrupted run are moved aside and a
    resume is recorded (see the module docstring).
    """

    def __init__(self, cfg: JobConfig, rank: int, world_size: int, start: Optional[RunStart] = None) -> None:
        self.enabled = rank == 0
        self.world_size = world_size
        self.flops_per_token = flops_per_token(cfg.model)
        self.peak = peak_tflops(cfg)
        self._tb = None
        self._jsonl = None
        self._interval_start = time.perf_counter()
        self._interval_tokens = 0
        self.superseded_last_step: Optional[int] = None
        """The last step the interrupted run had logged past this start (None: none)."""
        if not self.enabled:
            return
        resume = start is not None and start.kind == "resume"
        if cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard's steps are tokens: hide what the interrupted run logged past the resume.
            self._tb = SummaryWriter(cfg.logging.tensorboard_dir,
                                     purge_step=start.tokens + 1 if resume else None)
        if cfg.checkpoint.save_dir:
            Path(cfg.checkpoint.save_dir).mkdir(parents=True, exist_ok=True)
            path = Path(cfg.checkpoint.save_dir) / "metrics.jsonl"
            moved = 0
            if start is not None:
                reason = (f"resumed from {start.checkpoint or f'step {start.step}'}" if resume
                          else f"restarted ({start.kind}) at step {start.step}")
                seen: dict = {}
                moved = supersede_records_after(path, start.step, reason, seen)
                self.superseded_last_step = seen.get("last_step")
                if moved:
                    logger.warning("%s: %d line(s) logged after step %d by the interrupted run moved to %s",
                                   path, moved, start.step, SUPERSEDED)
            self._jsonl = open(path, "a")
            if resume or moved:
                self._jsonl.write(json.dumps({
                    "event": "resume" if resume else "restart", "step": start.step, "tokens": start.tokens,
                    "checkpoint": start.checkpoint, "superseded": moved, "time": _now()}) + "\n")
                self._jsonl.flush()

    def count_tokens(self, tokens: int) -> None:
        self._interval_tokens += tokens

    def log_train(self, step: int, record: dict) -> None:
        """Add throughput to ``record`` and emit it everywhere."""
        elapsed = max(time.perf_counter() - self._interval_start, 1e-9)
        tokens_per_s = self._interval_tokens / elapsed
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        record.update(tokens_per_s=tokens_per_s, tflops_per_device=tflops)
        if self.peak:
            record["mfu"] = tflops / self.peak
        self._interval_start, self._interval_tokens = time.perf_counter(), 0
        if not self.enabled:
            return
        parts = [f"step {step}", f"loss {record['train_loss']:.4f}", f"lr {record['lr']:.3e}",
                 f"grad_norm {record['grad_norm']:.3f}", f"tokens {record['tokens']:,}",
                 f"batch {record['global_batch_size']}", f"{tokens_per_s:,.0f} tok/s",
                 f"{tflops:.1f} TFLOP/s/dev"]
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        parts.append(f"skipped {record['skipped_steps']}")
        logger.info(" | ".join(parts))
        self._emit(step, record)

    def log_eval(self, step: int, tokens: int, valid_loss: float, extra: Optional[dict] = None) -> None:
        """Emit a validation loss, with the live forecast's fields (``forecast_*``) when given."""
        if not self.enabled:
            return
        if extra and "forecast_final_loss" in extra:
            # A forecast from a fit in a state known to miss says so on the same line.
            caveats = extra.get("forecast_caveats")
            note = f" (not to trust yet: {caveats})" if caveats else ""
            logger.info("step %d | validation loss %.4f | forecast final loss %.4f [%.4f, %.4f]%s",
                        step, valid_loss, extra["forecast_final_loss"], extra["forecast_final_low"],
                        extra["forecast_final_high"], note)
        else:
            logger.info("step %d | validation loss %.4f", step, valid_loss)
        self._emit(step, {"tokens": tokens, "valid_loss": valid_loss, **(extra or {})})

    def log_event(self, record: dict) -> None:
        """Append an event record (``{"event": ..., "step": ...}``) to ``metrics.jsonl`` (rank 0)."""
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({**record, "time": _now()}) + "\n")
            self._jsonl.flush()

    def _emit(self, step: int, record: dict) -> None:
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    tag = ("valid/loss" if key == "valid_loss" else
                           f"forecast/{key[len('forecast_'):]}" if key.startswith("forecast_") else f"train/{key}")
                    self._tb.add_scalar(tag, value, global_step=record.get("tokens", step))
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
