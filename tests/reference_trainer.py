"""An independent trainer to measure the stack against: transformers + torch AdamW, nothing of ours.

It trains an HF ``LlamaForCausalLM`` on given global batches the plain way: mean next-token
cross-entropy over the global batch, accumulated over micro-batches, ``clip_grad_norm_``, AdamW
with weight decay on matrices only, and a linear-warm-up + cosine LR written out here (not
imported from the stack). In ``bf16`` it runs the usual mixed-precision recipe by hand: fp32 master
weights, a bf16 working copy for forward and backward, gradients accumulated in fp32, the
optimizer on the fp32 master, the working copy refreshed from it after each step. In ``fp64``
everything is float64: the fp32 run's own rounding error is measured against it
(:attr:`ReferenceRun.weight_tolerance`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
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
    weight_tolerance: float = 0.0
    """fp32 only: how far another correct fp32 run may end from ``state`` (see
    :func:`fp32_weight_tolerance`)."""


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

    dtype = torch.float64 if settings.precision == "fp64" else torch.float32
    master = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=dtype)
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
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
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
    if settings.precision == "fp32":
        run.weight_tolerance = fp32_weight_tolerance(hf_dir, global_batches, settings, run)
    return run


def fp32_weight_tolerance(hf_dir: Path, global_batches: Sequence[Sequence[torch.Tensor]],
                          settings: ReferenceSettings, run: ReferenceRun) -> float:
    """How far a correct fp32 training of the same model may end from ``run``'s weights.

    Derived, not fitted on one CPU (a fixed 1e-5 failed at 1.38e-5 on a Xeon held to AVX2): Adam
    turns the fp32 rounding noise of near-zero gradients into updates of up to ~lr, so the final
    weights carry an error far above 2^-24 * |w| that depends on the summation order (GEMM
    blocking, micro-batch accumulation, the DP all-reduce). This run's own error is measured
    against the same training in float64 (one micro-batch per step: at float64 the order moves
    nothing, 3e-14): fp32_error = max |w_fp32 - w_fp64|. Any other correct fp32 run (the stack:
    other GEMMs, DP ranks, ZeRO partitions) has an error of the same kind; merely regrouping this
    run's micro-batches (4 instead of 8) ended 1.3-2.1 fp32_error from float64 (AMX and AVX2),
    so one within c = 3 fp32_error of float64 is within (c + 1) fp32_error of ``run``:
    tolerance 4 fp32_error (fp32_error 7.4e-6 on a Xeon, 8.0e-6 held to AVX2: tolerance 2.9e-5
    and 3.2e-5; the stack came within 1.3e-5, ZeRO-2 held to AVX2). Floor: each step rounds each
    weight, in each run, by up to 2^-24 |w|. Moments loaded as zeros on a resume miss it by 30x
    (9.3e-4: the first Adam step after losing them moves weights by ~lr = 1e-3).
    """
    sizes = {rows.shape[0] for micro_batches in global_batches for rows in micro_batches}
    assert len(sizes) == 1, f"micro-batches of unequal sizes {sizes}: their mean is not the batch's"
    whole = [[torch.cat(list(micro_batches))] for micro_batches in global_batches]
    exact = train_reference(hf_dir, whole, replace(settings, precision="fp64"))
    fp32_error = max((run.state[k].double() - exact.state[k]).abs().max().item() for k in run.state)
    largest = max(v.abs().max().item() for v in run.state.values())
    return max(4 * fp32_error, 2 * len(global_batches) * 2.0 ** -24 * largest)
