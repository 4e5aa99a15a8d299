"""The language-model loss: next-token cross-entropy (+ z-loss) on vocabulary-parallel logits.

This module owns the loss and its backends (``model.cross_entropy_backend``, resolved by
:mod:`megatron_tinyllama.model.kernels`). All of them compute the same function:

    lm_loss = sum_t mask_t * (logsumexp(x_t) - x_t[label_t]) / sum_t mask_t
    z_loss  = sum_t mask_t * logsumexp(x_t)^2 / sum_t mask_t          (when z_loss_weight > 0)
    loss    = lm_loss + z_loss_weight * z_loss

in fp32 arithmetic, with the softmax over the real vocabulary only (the rows the embedding was
padded with for TP take no part), and the normaliser assembled across TP ranks. They differ in
what they hold in memory:

* ``plain``: an fp32 copy of all logits, then megatron-core's vocab-parallel cross-entropy, which
  keeps an fp32 softmax for backward (about 3 fp32 copies of the logits at the peak).
* ``chunked``: :class:`VocabParallelLogSumExp` reads the logits chunk by chunk, keeps only the
  per-token log-normaliser, and in backward writes the gradient chunk by chunk into the logits'
  own storage. No full-size temporary; the chunk kernels are torch.compile'd on CUDA.
* ``megatron_fused``: megatron-core's fused vocab-parallel kernel (jit-compiled; bf16 gradients,
  so bf16 runs only).
* ``liger``: liger-kernel's Triton cross-entropy (TP=1, CUDA), which also computes the gradient in
  place during forward. It takes a 0/1 mask (the loader's masks are), as ignored labels. Its own
  loss is a bf16 sum of bf16 per-token losses, and it synchronises with the host (``.item()``):
  the loss reported is computed as the chunked backend's, in fp32, and ``auto`` never picks it.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

CHUNK_ELEMENTS = 1 << 25
"""Logit elements per chunk of the chunked backend (128 MiB of fp32 temporaries)."""


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                        z_loss_weight: float = 0.0, vocab_size: Optional[int] = None,
                        backend: str = "plain") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy over ``loss_mask`` (+ z-loss), in fp32, correct under TP.

    ``logits`` is the vocabulary-parallel slice from :func:`~megatron_tinyllama.model.build.forward_logits`.
    Given ``vocab_size``, the rows the embedding was padded with for TP take no part in the
    softmax: the loss is then the one the exported model (vocabulary cut back) has. The
    ``chunked``, ``megatron_fused`` and ``liger`` backends may overwrite ``logits`` (with the
    gradient, or -inf in padding columns): do not read them after calling this.

    Returns:
        (loss to backpropagate, {"lm_loss": cross-entropy, "z_loss": mean log(Z)^2 (if used)}).
    """
    if backend == "plain":
        return _plain_loss(logits, labels, loss_mask, z_loss_weight, vocab_size)
    denominator = loss_mask.sum().clamp(min=1.0)
    metrics: dict[str, torch.Tensor] = {}
    if backend == "liger":
        return _liger_loss(logits, labels, loss_mask, z_loss_weight, vocab_size, denominator)
    if backend == "chunked":
        log_z, label_logit = vocab_parallel_logsumexp_and_label_logit(logits, labels, vocab_size)
        per_token = log_z - label_logit
    elif backend == "megatron_fused":
        per_token, log_z = _megatron_fused_per_token(logits, labels, vocab_size, bool(z_loss_weight))
    else:
        raise ValueError(f"unknown cross-entropy backend {backend!r}")
    lm_loss = (per_token * loss_mask).sum() / denominator
    metrics["lm_loss"] = lm_loss.detach()
    total = lm_loss
    if z_loss_weight:
        z_loss = ((log_z ** 2) * loss_mask).sum() / denominator
        metrics["z_loss"] = z_loss.detach()
        total = total + z_loss_weight * z_loss
    return total, metrics


# ---------------------------------------------------------------------------------------------
# plain: what the stack always did


def _plain_loss(logits, labels, loss_mask, z_loss_weight, vocab_size):
    from megatron.core import tensor_parallel

    logits = logits.float()
    if vocab_size is not None:
        logits = mask_vocab_padding(logits, vocab_size)
    denominator = loss_mask.sum().clamp(min=1.0)
    metrics: dict[str, torch.Tensor] = {}
    total = 0.0
    if z_loss_weight:
        log_z = _vocab_parallel_logsumexp(logits)
        z_loss = ((log_z ** 2) * loss_mask).sum() / denominator
        metrics["z_loss"] = z_loss.detach()
        total = z_loss_weight * z_loss
    # megatron-core's kernel works in place on its input; give it its own copy when z-loss also
    # needs the logits.
    ce_input = logits.clone() if z_loss_weight else logits
    per_token = tensor_parallel.vocab_parallel_cross_entropy(ce_input, labels)
    lm_loss = (per_token * loss_mask).sum() / denominator
    metrics["lm_loss"] = lm_loss.detach()
    return lm_loss + total, metrics


def _tp_rank_size_group():
    from megatron.core import parallel_state

    size = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group() if size > 1 else None
    return parallel_state.get_tensor_model_parallel_rank(), size, group


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set this TP rank's logits of padding rows (ids >= vocab_size) to -inf, in place."""
    rank, _, _ = _tp_rank_size_group()
    local = logits.shape[-1]
    valid = vocab_size - rank * local
    if valid >= local:
        return logits
    # In place is safe: the logits' producer (a matmul, or the fp32 cast) does not need them back.
    logits[..., max(valid, 0):] = float("-inf")
    return logits


def _vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(logits))) over the full vocabulary split across TP ranks (differentiable)."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    local_max = logits.detach().max(dim=-1).values
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX,
                        group=parallel_state.get_tensor_model_parallel_group())
    sum_exp = torch.exp(logits - local_max.unsqueeze(-1)).sum(dim=-1)
    # Forward: all-reduce; backward: identity — d lse / d local_sum is the same on every rank.
    sum_exp = tensor_parallel.reduce_from_tensor_model_parallel_region(sum_exp)
    return torch.log(sum_exp) + local_max


# ---------------------------------------------------------------------------------------------
# chunked


def _chunk_stats(x: torch.Tensor, local_label: torch.Tensor, valid: int):
    """Per-row logsumexp over the first ``valid`` columns and the logit at ``local_label``."""
    x32 = x[:, :valid].float()
    return torch.logsumexp(x32, dim=-1), x32.gather(1, local_label.unsqueeze(1)).squeeze(1)


def _chunk_grad(x: torch.Tensor, log_z: torch.Tensor, grad_log_z: torch.Tensor,
                grad_label: torch.Tensor, local_label: torch.Tensor, valid: int) -> torch.Tensor:
    """d/dx of (grad_log_z * logsumexp + grad_label * x[label]) over the first ``valid`` columns."""
    grad = torch.exp(x[:, :valid].float() - log_z.unsqueeze(1)) * grad_log_z.unsqueeze(1)
    grad = grad.scatter_add(1, local_label.unsqueeze(1), grad_label.unsqueeze(1))
    return grad.to(x.dtype)


@functools.lru_cache(maxsize=None)
def _chunk_kernels(compiled: bool):
    if not compiled:
        return _chunk_stats, _chunk_grad
    return torch.compile(_chunk_stats, dynamic=False), torch.compile(_chunk_grad, dynamic=False)


class VocabParallelLogSumExp(torch.autograd.Function):
    """(logsumexp over the full vocabulary, logit of the label) per token, chunk by chunk.

    Forward keeps two fp32 numbers per token. Backward recomputes the softmax chunk by chunk and
    writes the gradient into the logits' storage (they are not needed afterwards), so no
    full-size temporary exists at any point. Under TP the per-rank statistics are combined with
    three all-reduces of one float per token.
    """

    @staticmethod
    def forward(ctx, logits, labels, valid: int, vocab_start: int, group, chunk_rows: int, compiled: bool):
        local_vocab = logits.shape[-1]
        x = logits.reshape(-1, local_vocab)
        local_label = labels.reshape(-1) - vocab_start
        on_rank = (local_label >= 0) & (local_label < max(valid, 0))
        local_label = local_label.clamp(0, max(valid - 1, 0))
        rows = x.shape[0]
        log_z = torch.full((rows,), float("-inf"), dtype=torch.float32, device=x.device)
        label_logit = torch.zeros(rows, dtype=torch.float32, device=x.device)
        stats, _ = _chunk_kernels(compiled)
        if valid > 0:
            for start in range(0, rows, chunk_rows):
                end = min(start + chunk_rows, rows)
                log_z[start:end], label_logit[start:end] = stats(x[start:end], local_label[start:end], valid)
        label_logit = torch.where(on_rank, label_logit, torch.zeros_like(label_logit))
        if group is not None:
            import torch.distributed as dist

            shift = log_z.clone()
            dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
            total = torch.exp(log_z - shift)
            dist.all_reduce(total, group=group)
            log_z = shift + torch.log(total)
            dist.all_reduce(label_logit, group=group)
        ctx.save_for_backward(logits, log_z, local_label, on_rank)
        ctx.valid, ctx.chunk_rows, ctx.compiled = valid, chunk_rows, compiled
        return log_z.view(labels.shape), label_logit.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_log_z, grad_label_logit):
        logits, log_z, local_label, on_rank = ctx.saved_tensors
        local_vocab = logits.shape[-1]
        grad = logits.reshape(-1, local_vocab)  # reused: the logits are not needed after this
        rows = grad.shape[0]
        zeros = torch.zeros(rows, dtype=torch.float32, device=grad.device)
        g_log_z = zeros if grad_log_z is None else grad_log_z.reshape(-1).float()
        g_label = zeros if grad_label_logit is None else grad_label_logit.reshape(-1).float()
        g_label = torch.where(on_rank, g_label, zeros)
        _, grad_kernel = _chunk_kernels(ctx.compiled)
        valid = ctx.valid
        for start in range(0, rows, ctx.chunk_rows):
            end = min(start + ctx.chunk_rows, rows)
            if valid > 0:
                grad[start:end, :valid] = grad_kernel(grad[start:end], log_z[start:end], g_log_z[start:end],
                                                      g_label[start:end], local_label[start:end], valid)
            grad[start:end, max(valid, 0):] = 0
        return grad.view(logits.shape), None, None, None, None, None, None


def vocab_parallel_logsumexp_and_label_logit(logits: torch.Tensor, labels: torch.Tensor,
                                             vocab_size: Optional[int] = None,
                                             chunk_elements: int = CHUNK_ELEMENTS,
                                             compiled: Optional[bool] = None):
    """Per-token log-normaliser over the (unpadded) vocabulary and the label's logit, both fp32.

    Args:
        logits: this TP rank's slice [..., V/TP], any float dtype; its storage is reused for its
            gradient in backward.
        labels: global token ids, ``logits.shape[:-1]``.
        vocab_size: real vocabulary; columns at or beyond it are padding (None: no padding).
        chunk_elements: logit elements per chunk.
        compiled: torch.compile the chunk kernels (default: on CUDA).
    """
    rank, size, group = _tp_rank_size_group()
    local_vocab = logits.shape[-1]
    vocab_start = rank * local_vocab
    valid = local_vocab if vocab_size is None else min(local_vocab, vocab_size - vocab_start)
    if compiled is None:
        compiled = logits.is_cuda
    chunk_rows = max(1, chunk_elements // local_vocab)
    return VocabParallelLogSumExp.apply(logits, labels, valid, vocab_start, group, chunk_rows, compiled)


# ---------------------------------------------------------------------------------------------
# megatron-core fused, liger


def _megatron_fused_per_token(logits, labels, vocab_size, want_log_z: bool):
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    _, _, group = _tp_rank_size_group()
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    if vocab_size is not None:
        logits = mask_vocab_padding(logits, vocab_size)
    log_z = _vocab_parallel_logsumexp(logits.float()) if want_log_z else None
    # The kernel reads an fp32 copy of its input (its first step), so ``logits`` stays intact.
    return fused_vocab_parallel_cross_entropy(logits, labels, group), log_z


def _liger_loss(logits, labels, loss_mask, z_loss_weight, vocab_size, denominator):
    from liger_kernel.transformers.functional import liger_cross_entropy

    _, size, _ = _tp_rank_size_group()
    if size > 1:
        raise ValueError("cross_entropy_backend=liger sees one vocabulary slice: TP=1 only")
    # liger stores per-token losses in the logits' dtype and sums them there: in bf16 a sum of
    # ~7000 (8 x 2048 tokens) steps by 32, so its loss moves in steps of ~0.01. The reported loss
    # is the fp32 mean of fp32 per-token statistics, read (one chunked pass, no gradient) before
    # liger overwrites the logits with their gradient; liger's sum only carries the gradient.
    with torch.no_grad():
        log_z, label_logit = vocab_parallel_logsumexp_and_label_logit(logits, labels, vocab_size)
        lm_loss = ((log_z - label_logit) * loss_mask).sum() / denominator
        z_loss = ((log_z ** 2) * loss_mask).sum() / denominator
    if vocab_size is not None:
        logits = mask_vocab_padding(logits, vocab_size)
    ignore = -100
    flat_labels = labels.reshape(-1).masked_fill(loss_mask.reshape(-1) == 0, ignore)
    out = liger_cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_labels, ignore_index=ignore,
                              reduction="sum", lse_square_scale=float(z_loss_weight),
                              return_z_loss=True)
    total = out.loss if hasattr(out, "loss") else out[0]
    metrics: dict[str, torch.Tensor] = {"lm_loss": lm_loss}
    exact = lm_loss
    if z_loss_weight:
        metrics["z_loss"] = z_loss
        exact = lm_loss + z_loss_weight * z_loss
    carrier = total.float() / denominator
    # The value is the exact fp32 loss; the gradient is liger's (carrier - carrier is 0).
    return exact + (carrier - carrier.detach()), metrics
