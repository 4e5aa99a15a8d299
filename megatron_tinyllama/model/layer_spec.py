"""The megatron-core ``ModuleSpec`` of one TinyLlama decoder layer.

It is megatron-core's local spec (ColumnParallelLinear for fused QKV and [gate; up], RowParallelLinear
for the output projections) with our :class:`FusedCoreAttention` as core attention, and the norm,
RoPE and GQA kernels of a resolved :class:`~megatron_tinyllama.model.kernels.KernelPlan`
(megatron-core's fused SwiGLU is switched in the TransformerConfig, not here).
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_tinyllama.model.attention import CoreRotarySelfAttention, core_attention_class
from megatron_tinyllama.model.kernels import PLAIN_PLAN, KernelPlan
from megatron_tinyllama.model.norm import norm_class


class RowParallelLinearWithGroup(RowParallelLinear):
    """megatron-core's RowParallelLinear, handing its own TP group to the matmul.

    megatron-core (0.16-0.19) calls its matmul with ``tp_group=None``, which makes the matmul look
    the default group up again and issue a deprecation warning on every call; under torch.compile
    that warning breaks the layer's graph twice per layer. The group it falls back to is this
    layer's own, so passing it changes nothing else.
    """

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


def get_layer_spec(normalization: str = "RMSNorm", qk_layernorm: bool = False,
                   attention_backend: str = "auto", kernels: KernelPlan = PLAIN_PLAN,
                   rope_base: float = 10000.0, rope_scaling: str = "none",
                   rope_scaling_factor: float = 1.0) -> ModuleSpec:
    """Spec of a pre-norm decoder layer: norm -> GQA attention -> norm -> SwiGLU MLP, no biases.

    Args:
        normalization: "RMSNorm" (TinyLlama) or "LayerNorm" (the over-training testbed).
        qk_layernorm: normalise queries and keys per head before RoPE.
        attention_backend: "auto", "sdpa", "flash_attn" or "math" (see attention.py).
        kernels: resolved backends; the plain plan is what the stack always computed.
        rope_base: RoPE base, for the backends that apply RoPE inside core attention.
        rope_scaling, rope_scaling_factor: RoPE scaling, for the same backends.
    """
    norm = norm_class(normalization, kernels.norm)
    rope_in_core = kernels.rope != "torch"
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                # RoPE in core attention: megatron-core's SelfAttention must not apply it first.
                module=CoreRotarySelfAttention if rope_in_core else SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention_class(
                        attention_backend, rope=kernels.rope if rope_in_core else None,
                        rope_base=rope_base, gqa=kernels.gqa, rope_scaling=rope_scaling,
                        rope_scaling_factor=rope_scaling_factor),
                    linear_proj=RowParallelLinearWithGroup,
                    q_layernorm=norm if qk_layernorm else IdentityOp,
                    k_layernorm=norm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinearWithGroup),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_block_spec(layer_spec: ModuleSpec, num_layers: int, normalization: str = "RMSNorm",
                   kernels: KernelPlan = PLAIN_PLAN) -> TransformerBlockSubmodules:
    """All layers plus the final norm, which then uses the same norm backend as the layers
    (megatron-core otherwise picks its own at import time: TE, else apex's LayerNorm-only kernel)."""
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers,
                                      layer_norm=norm_class(normalization, kernels.norm))
