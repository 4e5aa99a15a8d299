"""ModelConfig -> megatron-core TransformerConfig -> GPTModel, and the language-model loss.

The translation to ``TransformerConfig`` is written out field by field (no copying of same-named
attributes), so every architectural choice of TinyLlama is visible here: pre-norm RMSNorm, GQA,
RoPE on the full head, SwiGLU (gated_linear_unit + silu), no biases, untied embeddings.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from megatron_tinyllama.config import ModelConfig
from megatron_tinyllama.model.layer_spec import get_layer_spec

logger = logging.getLogger(__name__)

VOCAB_DIVISIBLE_BY = 128
"""The embedding is padded to a multiple of this times the TP degree (tensor-core friendly)."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    """Vocabulary rounded up so each TP rank holds an equal, aligned slice."""
    multiple = VOCAB_DIVISIBLE_BY * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def build_transformer_config(model_cfg: ModelConfig, tensor_parallel_size: int = 1,
                             precision: str = "fp32"):
    """The megatron-core ``TransformerConfig`` for ``model_cfg``.

    Weights are always initialised on the CPU (``use_cpu_initialization``): full matrices from
    torch's default RNG, sliced per TP rank, so the same seed gives the same model at any TP
    degree; without CUDA it is also the only path (megatron's GPU path calls
    ``torch.cuda.current_device()``).

    Args:
        model_cfg: architecture.
        tensor_parallel_size: TP degree; must divide heads and query groups.
        precision: "fp32", "bf16" or "fp16" (parameter dtype of the built modules).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_tinyllama.config import ConfigError

    for name in ("num_attention_heads", "num_query_groups"):
        if getattr(model_cfg, name) % tensor_parallel_size:
            raise ConfigError(
                f"parallel.tensor_parallel_size={tensor_parallel_size} does not divide "
                f"model.{name}={getattr(model_cfg, name)}"
            )
    dtype = _DTYPES[precision]
    recompute = model_cfg.activation_checkpointing
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.head_dim,
        normalization=model_cfg.normalization,
        layernorm_epsilon=model_cfg.norm_epsilon,
        qk_layernorm=model_cfg.qk_layernorm,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model_cfg.init_method_std,
        tensor_model_parallel_size=tensor_parallel_size,
        sequence_parallel=False,
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # The kernel fusions below need CUDA extensions; our attention/norm choices are explicit.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )


def build_model(model_cfg: ModelConfig, tensor_parallel_size: int = 1, precision: str = "fp32"):
    """Build this rank's shard of the GPTModel (megatron-core parallel state must be initialised).

    Weights are drawn from torch's default RNG; seed it identically on all ranks first
    (:func:`megatron_tinyllama.parallel.init.set_seed`).
    """
    from megatron.core.models.gpt import GPTModel

    transformer_config = build_transformer_config(model_cfg, tensor_parallel_size, precision)
    spec = get_layer_spec(model_cfg.normalization, model_cfg.qk_layernorm, model_cfg.attention_backend)
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(model_cfg.vocab_size, tensor_parallel_size),
        max_sequence_length=model_cfg.seq_length,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=not model_cfg.untie_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(model_cfg.rope_base),
    )
    if torch.cuda.is_available() and not next(model.parameters()).is_cuda:
        model = model.cuda()
    return model


def use_fp32_rotary_frequencies(model, model_cfg: ModelConfig) -> int:
    """Recompute every rotary embedding's inverse frequencies in fp32; returns how many.

    Call it outside ``deepspeed.zero.Init``: that context converts every floating tensor created
    inside it to the engine dtype, so under bf16 megatron-core's ``inv_freq`` is born in bf16, and
    the positions it builds with ``arange(..., dtype=inv_freq.dtype)`` too. bf16 holds integers
    exactly only up to 256, so positions collapse in groups and RoPE angles at position 2047 are
    wrong by whole radians. The formula is megatron-core's (and HF Llama's), in fp32.
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    dim = model_cfg.head_dim
    inv_freq = 1.0 / (model_cfg.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    count = 0
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = inv_freq.to(module.inv_freq.device)
            count += 1
    cache_clear = getattr(RotaryEmbedding.forward, "cache_clear", None)
    if cache_clear is not None:  # forward is lru_cached on (max_seq_len, offset): drop old tables
        cache_clear()
    return count


def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """This rank's vocabulary slice of the logits, [batch, seq, padded_vocab / TP]."""
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, attention_mask=None)


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                        z_loss_weight: float = 0.0, vocab_size: Optional[int] = None,
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy over ``loss_mask`` (+ z-loss), in fp32, correct under TP.

    ``logits`` is the vocabulary-parallel slice from :func:`forward_logits`; the softmax
    normaliser is assembled across TP ranks by megatron-core's vocab-parallel cross-entropy.
    Given ``vocab_size``, the rows the embedding was padded with for TP take no part in the
    softmax: the loss is then the one the exported model (vocabulary cut back) has.

    Returns:
        (loss to backpropagate, {"lm_loss": cross-entropy, "z_loss": mean log(Z)^2 (if used)}).
    """
    from megatron.core import tensor_parallel

    logits = logits.float()
    if vocab_size is not None:
        logits = _mask_vocab_padding(logits, vocab_size)
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


def _mask_vocab_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set this TP rank's logits of padding rows (ids >= vocab_size) to -inf."""
    from megatron.core import parallel_state

    local = logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * local
    valid = vocab_size - first
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
