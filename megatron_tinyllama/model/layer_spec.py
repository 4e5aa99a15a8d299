"""The megatron-core ``ModuleSpec`` of one TinyLlama decoder layer.

It is megatron-core's local spec (ColumnParallelLinear for fused QKV and [gate; up], RowParallelLinear
for the output projections) with our :class:`FusedCoreAttention` as core attention and the norm
chosen here: torch's RMSNorm (TinyLlama) always; for LayerNorm shapes (the over-training testbed)
megatron-core's apex-backed ``FusedLayerNorm`` when NVIDIA apex is importable on CUDA, torch's
otherwise.
"""

from __future__ import annotations

import logging

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_tinyllama.model.attention import core_attention_class

logger = logging.getLogger(__name__)


def _norm_module(normalization: str) -> type:
    """apex's FusedLayerNorm for LayerNorm when it can run (CUDA + apex), else torch's norm
    (always for RMSNorm); the log says which."""
    if torch.cuda.is_available():
        try:
            import apex  # noqa: F401  (NVIDIA apex, never the PyPI name)
            from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

            if normalization == "LayerNorm":
                logger.info("norm backend: apex FusedLayerNorm")
                return FusedLayerNorm
        except ImportError:
            pass
    logger.info("norm backend: torch %s", normalization)
    return WrappedTorchNorm


def get_layer_spec(normalization: str = "RMSNorm", qk_layernorm: bool = False,
                   attention_backend: str = "auto") -> ModuleSpec:
    """Spec of a pre-norm decoder layer: norm -> GQA attention -> norm -> SwiGLU MLP, no biases.

    Args:
        normalization: "RMSNorm" (TinyLlama) or "LayerNorm" (the over-training testbed).
        qk_layernorm: normalise queries and keys per head before RoPE.
        attention_backend: "auto", "sdpa", "flash_attn" or "math" (see attention.py).
    """
    norm = _norm_module(normalization)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention_class(attention_backend),
                    linear_proj=RowParallelLinear,
                    q_layernorm=norm if qk_layernorm else IdentityOp,
                    k_layernorm=norm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
