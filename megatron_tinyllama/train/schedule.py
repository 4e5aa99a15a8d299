"""Learning rate as a function of tokens consumed.

Indexing by tokens rather than steps keeps the curve when a later stage changes the batch size
(TinyLlama v1.1 cools down by growing the batch). Linear warm-up to ``lr``, then cosine (or linear)
decay to ``min_lr`` at ``decay_tokens``, constant ``min_lr`` after. TinyLlama's issue #27 (min LR
equal to max, so nothing decayed) is caught by ``OptimizerConfig`` validation and a test.
"""

from __future__ import annotations

import math

from megatron_tinyllama.config import OptimizerConfig


def learning_rate(tokens: int, opt: OptimizerConfig, total_tokens: int) -> float:
    """The learning rate after ``tokens`` tokens of training."""
    decay_end = opt.decay_tokens or total_tokens
    if opt.warmup_tokens and tokens < opt.warmup_tokens:
        return opt.lr * tokens / opt.warmup_tokens
    if opt.schedule == "constant" or decay_end <= opt.warmup_tokens:
        return opt.lr
    progress = min(1.0, (tokens - opt.warmup_tokens) / (decay_end - opt.warmup_tokens))
    if opt.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return opt.min_lr + (opt.lr - opt.min_lr) * factor
