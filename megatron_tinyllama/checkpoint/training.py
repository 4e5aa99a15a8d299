"""Training checkpoints: DeepSpeed's sharded state plus our metadata and a convertible model export.

Layout of ``checkpoint.save_dir``::

    latest                      tag of the newest *complete* checkpoint (written last, atomically)
    config.yaml                 the resolved recipe of the run
    metrics.jsonl               one JSON record per logged step (written by the trainer)
    global_step000100/          DeepSpeed's files (ZeRO-3 shards, optimizer states) for step 100
        trainer_state.json      step, tokens and samples consumed, skipped steps, recipe
        rng/rank00000.pt        every rank's RNG states
        model/                  per-TP-rank full weights (see checkpoint.native), for the converter

A kill during a save leaves an incomplete tag directory that ``latest`` does not name, so resume
and conversion use the previous checkpoint. DeepSpeed's own ``latest`` writing is turned off.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_tinyllama.checkpoint.native import write_model_files
from megatron_tinyllama.config import JobConfig

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainerState:
    """Progress counters that, with the DeepSpeed state, make a resume exact."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0


def step_tag(step: int) -> str:
    return f"global_step{step:06d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_latest(save_dir: Path) -> Optional[str]:
    latest = Path(save_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if tag and (Path(save_dir) / tag / TRAINER_STATE).is_file() else None


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


def export_model_weights(model: torch.nn.Module, cfg: JobConfig, directory: Path) -> None:
    """Gather this TP rank's full weights from ZeRO-3 shards; DP rank 0 of each TP group writes them."""
    import deepspeed
    from megatron.core import parallel_state

    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None,
                                               enabled=hasattr(param, "ds_id")):
            if parallel_state.get_data_parallel_rank() == 0:
                state[name] = param.data.detach().float().cpu().clone()
    if parallel_state.get_data_parallel_rank() == 0:
        write_model_files(directory, cfg.model, parallel_state.get_tensor_model_parallel_rank(),
                          parallel_state.get_tensor_model_parallel_world_size(), state)


def save_training_checkpoint(engine, cfg: JobConfig, state: TrainerState) -> Path:
    """Save everything for an exact resume, then point ``latest`` at it. Collective: all ranks."""
    save_dir = Path(cfg.checkpoint.save_dir)
    tag = step_tag(state.step)
    tag_dir = save_dir / tag
    rank = dist.get_rank()
    if rank == 0 and tag_dir.exists():  # an interrupted earlier save of the same step
        shutil.rmtree(tag_dir)
    dist.barrier()
    engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)
    (tag_dir / "rng").mkdir(parents=True, exist_ok=True)
    (tag_dir / "model").mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), tag_dir / "rng" / f"rank{rank:05d}.pt")
    export_model_weights(engine.module, cfg, tag_dir / "model")
    dist.barrier()
    if rank == 0:
        payload = {**asdict(state), "config": cfg.to_dict(), "world_size": dist.get_world_size()}
        _write_atomic(tag_dir / TRAINER_STATE, json.dumps(payload, indent=2))
        _write_atomic(save_dir / "latest", tag)
        _prune(save_dir, keep=cfg.checkpoint.keep_last, current=tag)
    dist.barrier()
    logger.info("saved checkpoint %s", tag_dir)
    return tag_dir


def _prune(save_dir: Path, keep: int, current: str) -> None:
    if keep <= 0:
        return
    tags = sorted(p.name for p in save_dir.glob("global_step*") if p.is_dir())
    complete = [t for t in tags if (save_dir / t / TRAINER_STATE).is_file()]
    for tag in complete[:-keep]:
        if tag != current:
            shutil.rmtree(save_dir / tag, ignore_errors=True)


def load_training_checkpoint(engine, load_dir: Path) -> Optional[TrainerState]:
    """Restore DeepSpeed state, RNG and counters from ``load_dir``'s latest complete checkpoint."""
    tag = read_latest(load_dir)
    if tag is None:
        return None
    engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    payload = json.loads((Path(load_dir) / tag / TRAINER_STATE).read_text())
    rng_file = Path(load_dir) / tag / "rng" / f"rank{dist.get_rank():05d}.pt"
    if rng_file.is_file() and payload.get("world_size") == dist.get_world_size():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    fields = {k: payload[k] for k in asdict(TrainerState())}
    logger.info("resumed from %s: %s", Path(load_dir) / tag, fields)
    return TrainerState(**fields)
