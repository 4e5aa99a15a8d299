"""What the trainer reports: console lines, TensorBoard scalars and ``metrics.jsonl``, from rank 0.

Throughput is measured over each log interval. Model FLOPs per token follow the usual dense
transformer count (Megatron-LM / PaLM appendix B): 6 x non-embedding parameters for the matmuls
plus 12 x layers x hidden x seq for attention scores and values, forward and backward; activation
recomputation is not counted (so MFU is model FLOPs utilisation, not hardware).

:func:`output_problems` checks, before anything is built, that the folders a run writes (these
sinks and the checkpoints) can be created and written.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
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


class MetricsWriter:
    """Rank-0 sink for training metrics; a no-op object on other ranks."""

    def __init__(self, cfg: JobConfig, rank: int, world_size: int) -> None:
        self.enabled = rank == 0
        self.world_size = world_size
        self.flops_per_token = flops_per_token(cfg.model)
        self.peak = peak_tflops(cfg)
        self._tb = None
        self._jsonl = None
        self._interval_start = time.perf_counter()
        self._interval_tokens = 0
        if not self.enabled:
            return
        if cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(cfg.logging.tensorboard_dir)
        if cfg.checkpoint.save_dir:
            Path(cfg.checkpoint.save_dir).mkdir(parents=True, exist_ok=True)
            self._jsonl = open(Path(cfg.checkpoint.save_dir) / "metrics.jsonl", "a")

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
            logger.info("step %d | validation loss %.4f | forecast final loss %.4f [%.4f, %.4f]", step,
                        valid_loss, extra["forecast_final_loss"], extra["forecast_final_low"],
                        extra["forecast_final_high"])
        else:
            logger.info("step %d | validation loss %.4f", step, valid_loss)
        self._emit(step, {"tokens": tokens, "valid_loss": valid_loss, **(extra or {})})

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
