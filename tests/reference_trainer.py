"""An independent trainer to measure the stack against: transformers + torch AdamW, nothing of ours.

It trains an HF ``LlamaForCausalLM`` on given global batches the plain way: mean next-token
cross-entropy over the global batch, accumulated over micro-batches, ``clip_grad_norm_``, AdamW
with weight decay on matrices only, and a linear-warm-up + cosine LR written out here (not
imported from the stack). In ``bf16`` it runs the usual mixed-precision recipe by hand: fp32 master
weights, a bf16 working copy for forward and backward, gradients accumulated in fp32, the
optimizer on the fp32 master, the working copy refreshed from it after each step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


@dataclass
class ReferenceSettings:
    lr: float
    min_lr: float
    warmup_tokens: int
    decay_tokens: int
    weight_decay: float
    grad_clip: float
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    precision: str = "fp32"


@dataclass
class ReferenceRun:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    """Gradient norm before clipping, per step."""
    state: dict[str, torch.Tensor] = field(default_factory=dict)


def reference_lr(tokens: int, s: ReferenceSettings) -> float:
    if tokens < s.warmup_tokens:
        return s.lr * tokens / s.warmup_tokens
    progress = min(1.0, (tokens - s.warmup_tokens) / (s.decay_tokens - s.warmup_tokens))
    return s.min_lr + (s.lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_reference(hf_dir: Path, global_batches: Sequence[Sequence[torch.Tensor]],
                    settings: ReferenceSettings,
                    on_step: Callable[[int], None] = lambda step: None) -> ReferenceRun:
    """Train the HF model in ``hf_dir`` on ``global_batches`` (each a list of micro-batches of
    token rows of length seq + 1) and return per-step losses, pre-clip norms and final weights."""
    import transformers

    master = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    master.train()
    work = master
    if settings.precision == "bf16":
        work = copy.deepcopy(master).to(torch.bfloat16)
        work.train()
    params = [p for p in master.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": settings.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2),
                                  eps=settings.eps)
    run = ReferenceRun()
    tokens_seen = 0
    for step, micro_batches in enumerate(global_batches, start=1):
        optimizer.zero_grad(set_to_none=True)
        work.zero_grad(set_to_none=True)
        step_loss = 0.0
        for rows in micro_batches:
            inputs, labels = rows[:, :-1], rows[:, 1:]
            logits = work(input_ids=inputs).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
            (loss / len(micro_batches)).backward()
            step_loss += loss.item() / len(micro_batches)
            if work is not master:  # accumulate the bf16 gradients in fp32 on the master
                for p_master, p_work in zip(master.parameters(), work.parameters()):
                    grad = p_work.grad.float()
                    p_master.grad = grad if p_master.grad is None else p_master.grad + grad
                work.zero_grad(set_to_none=True)
            tokens_seen += inputs.numel()
        norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = reference_lr(tokens_seen, settings)
        optimizer.step()
        if work is not master:
            with torch.no_grad():
                for p_master, p_work in zip(master.parameters(), work.parameters()):
                    p_work.copy_(p_master.to(torch.bfloat16))
        run.losses.append(step_loss)
        run.grad_norms.append(norm.item())
        on_step(step)
    run.state = {k: v.detach().clone() for k, v in master.state_dict().items()}
    return run
