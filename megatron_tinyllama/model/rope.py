"""RoPE frequencies, with the context-extension scalings megatron-core can express.

This module owns the numbers of rotary position embeddings: the fp32 inverse frequencies of a
:class:`~megatron_tinyllama.config.ModelConfig` (``rope_base``, ``rope_scaling``,
``rope_scaling_factor``), the cos/sin tables of the fused RoPE backends, and the arguments that
make megatron-core's ``GPTModel`` compute the same. Every path that rotates queries and keys
(megatron-core's ``RotaryEmbedding``, the fp32 recompute after ``zero.Init``, the fused kernels in
core attention) takes its frequencies from here, so they cannot disagree.

Two scalings, each the formula of HF transformers' ``rope_parameters`` of the same name:

* ``linear``: positions divided by the factor (megatron-core's ``seq_len_interpolation_factor``;
  transformers divides the inverse frequencies instead, the same angles up to fp32 rounding).
* ``llama3``: wavelengths above ``original_max_position_embeddings / low_freq_factor`` divided by
  the factor, those below ``.../high_freq_factor`` kept, the band between blended (megatron-core's
  ``rope_scaling``). megatron-core fixes low_freq_factor 1, high_freq_factor 4 and
  original_max_position_embeddings 8192 (Llama 3.1 and 3.2's values) and lets only the factor vary,
  so only those values are accepted.

Others (yarn, dynamic, longrope, ...) have no megatron-core counterpart and are refused where a
config names them (:func:`megatron_tinyllama.checkpoint.hf.model_config_from_hf`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

ROPE_SCALINGS = ("none", "linear", "llama3")
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
"""The llama3 parameters megatron-core's ``RotaryEmbedding._apply_scaling`` uses (not settable
through ``GPTModel``)."""


def rope_inv_freq(head_dim: int, base: float, scaling: str = "none", factor: float = 1.0,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """fp32 inverse frequencies, [head_dim / 2], with llama3 scaling applied (linear scaling acts on
    positions: :func:`position_scale`).

    The formula and its order of operations are megatron-core's and transformers' (fp32 arange over
    the dimension, base ** (i / d)), so the tables agree bit for bit.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
                               / head_dim))
    if scaling != "llama3":
        return inv_freq
    low, high = LLAMA3_FIXED["low_freq_factor"], LLAMA3_FIXED["high_freq_factor"]
    old_context = LLAMA3_FIXED["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


def position_scale(scaling: str, factor: float) -> Optional[float]:
    """megatron-core's ``seq_len_interpolation_factor``: the factor for linear scaling, else None."""
    return float(factor) if scaling == "linear" else None


def rotary_cos_sin(seq_len: int, head_dim: int, base: float, device: torch.device,
                   scaling: str = "none", factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin of the RoPE angles, [seq_len, head_dim] (halves duplicated, HF layout).

    Positions and inverse frequencies are fp32 whatever the model dtype: bf16 holds integers
    exactly only up to 256. Linear scaling multiplies positions by ``1 / factor`` as
    megatron-core does.
    """
    inv_freq = rope_inv_freq(head_dim, base, scaling, factor, device)
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    interpolation = position_scale(scaling, factor)
    if interpolation is not None:
        positions *= 1 / interpolation
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def mcore_rope_kwargs(scaling: str, factor: float) -> dict:
    """The ``GPTModel`` arguments that make megatron-core's ``RotaryEmbedding`` apply ``scaling``."""
    return {
        "seq_len_interpolation_factor": position_scale(scaling, factor),
        "rope_scaling": scaling == "llama3",
        "rope_scaling_factor": float(factor) if scaling == "llama3" else 8.0,
    }
