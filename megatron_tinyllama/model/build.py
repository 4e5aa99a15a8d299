"""ModelConfig -> megatron-core TransformerConfig -> GPTModel.

The translation to ``TransformerConfig`` is written out field by field (no copying of same-named
attributes), so every architectural choice of TinyLlama is visible here: pre-norm RMSNorm, GQA,
RoPE on the full head, SwiGLU (gated_linear_unit + silu), no biases, untied embeddings. Which
kernels compute it is a separate, resolved choice (:mod:`megatron_tinyllama.model.kernels`). The
loss lives in :mod:`megatron_tinyllama.model.loss` (``language_model_loss`` is re-exported here).
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_tinyllama.config import ModelConfig
from megatron_tinyllama.model.kernels import PLAIN_PLAN, KernelPlan
from megatron_tinyllama.model.layer_spec import get_block_spec, get_layer_spec
from megatron_tinyllama.model.loss import language_model_loss  # noqa: F401  (re-exported)
from megatron_tinyllama.model.rope import mcore_rope_kwargs, rope_inv_freq

logger = logging.getLogger(__name__)

VOCAB_DIVISIBLE_BY = 128
"""The embedding is padded to a multiple of this times the TP degree (tensor-core friendly)."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    """Vocabulary rounded up so each TP rank holds an equal, aligned slice."""
    multiple = VOCAB_DIVISIBLE_BY * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


class InitialWeights:
    """Draws every initial weight in fp32 on the CPU, from a generator seeded by the seed alone.

    megatron-core (``use_cpu_initialization``) builds each full weight matrix ("master weight"),
    calls the config's init method on it and keeps this TP rank's slice, so the same draws give
    the same model at any TP degree. But under ``deepspeed.zero.Init`` that master weight is
    created in the engine dtype on the engine's device (bf16 on the GPU), and an init method that
    fills it in place would draw in bf16 from the CUDA generator: ZeRO-1 and ZeRO-3 runs with one
    seed would start from different models. So each tensor is drawn here into an fp32 CPU buffer
    (made by numpy, which zero.Init does not patch), from its own generator seeded by
    ``(seed, index of the tensor in construction order)`` (torch's other RNG users cannot shift
    it), and then copied (cast) into whatever megatron-core handed over.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.drawn = 0

    def normal(self, std: float):
        """An init method (``fn(tensor)``) drawing N(0, std)."""

        def init_(tensor: torch.Tensor) -> torch.Tensor:
            import numpy as np

            generator = torch.Generator(device="cpu")
            generator.manual_seed((self.seed * 1_000_003 + self.drawn) % (1 << 63))
            self.drawn += 1
            values = torch.from_numpy(np.empty(tuple(tensor.shape), dtype=np.float32))
            values.normal_(0.0, std, generator=generator)
            with torch.no_grad():
                tensor.copy_(values)
            return tensor

        return init_


def build_transformer_config(model_cfg: ModelConfig, tensor_parallel_size: int = 1,
                             precision: str = "fp32", kernels: KernelPlan = PLAIN_PLAN,
                             init_seed: Optional[int] = None):
    """The megatron-core ``TransformerConfig`` for ``model_cfg``.

    Weights are always initialised on the CPU (``use_cpu_initialization``): full matrices drawn
    in fp32 by :class:`InitialWeights` from ``init_seed`` alone, sliced per TP rank, so the same
    seed gives the same model at any TP degree and ZeRO stage, on CPU and GPU; without CUDA it is
    also the only path (megatron's GPU path calls ``torch.cuda.current_device()``).

    Args:
        model_cfg: architecture.
        tensor_parallel_size: TP degree; must divide heads and query groups.
        precision: "fp32", "bf16" or "fp16" (parameter dtype of the built modules).
        kernels: resolved speed levers; only the SwiGLU choice lives in the TransformerConfig.
        init_seed: seed of the initial weights (None: torch's default generator's seed, as set
            by ``torch.manual_seed``).
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
    weights = InitialWeights(torch.initial_seed() if init_seed is None else init_seed)
    std = model_cfg.init_method_std
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
        init_method_std=std,
        # megatron-core's defaults (N(0, std); output projections std / sqrt(2 * layers)), drawn
        # by InitialWeights; the embedding uses init_method (same std).
        init_method=weights.normal(std),
        output_layer_init_method=weights.normal(std / math.sqrt(2.0 * model_cfg.num_layers)),
        tensor_model_parallel_size=tensor_parallel_size,
        sequence_parallel=False,
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # megatron-core's SwiGLU fusion is plain torch.compile (its jit_fuser), no CUDA extension.
        # The other fusions below need CUDA extensions; attention, norm and RoPE are ours.
        bias_activation_fusion=kernels.swiglu == "fused",
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


def build_model(model_cfg: ModelConfig, tensor_parallel_size: int = 1, precision: str = "fp32",
                kernels: Optional[KernelPlan] = None, init_seed: Optional[int] = None):
    """Build this rank's shard of the GPTModel (megatron-core parallel state must be initialised).

    The initial weights are a function of ``init_seed`` alone (:class:`InitialWeights`: fp32
    draws on the CPU, the same at every TP degree and ZeRO stage, inside ``zero.Init`` or not).
    Without it, torch's default generator's seed is used: seed it identically on all ranks first
    (:func:`megatron_tinyllama.parallel.init.set_seed`). The kernels do not change the parameters
    (names, shapes, initial values), only how they are computed with.

    Args:
        kernels: resolved speed levers (:func:`megatron_tinyllama.model.kernels.resolve_kernels`);
            None builds the plain path (conversion, evaluation, tests).
        init_seed: seed of the initial weights (the training engine passes ``parallel.seed``).
    """
    from megatron.core.models.gpt import GPTModel

    kernels = kernels or PLAIN_PLAN
    transformer_config = build_transformer_config(model_cfg, tensor_parallel_size, precision, kernels,
                                                  init_seed=init_seed)
    layer_spec = get_layer_spec(model_cfg.normalization, model_cfg.qk_layernorm, model_cfg.attention_backend,
                                kernels, model_cfg.rope_base, model_cfg.rope_scaling,
                                model_cfg.rope_scaling_factor)
    spec = get_block_spec(layer_spec, model_cfg.num_layers, model_cfg.normalization, kernels)
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
        **mcore_rope_kwargs(model_cfg.rope_scaling, model_cfg.rope_scaling_factor),
    )
    if torch.cuda.is_available() and not next(model.parameters()).is_cuda:
        model = model.cuda()
    if kernels.compile_layers:
        compile_layers(model)
    return model


def compile_layers(model) -> int:
    """torch.compile each transformer layer's forward in place (parameter names unchanged);
    returns how many.

    Layers are compiled one by one rather than the whole model: the layers share one graph (same
    code, parameters as inputs), so compile time does not grow with depth, and the embedding, the
    output layer and the loss stay eager (the loss has its own kernels).

    Only ``forward`` is compiled, not the module's call, so a module's own hooks run eagerly
    around its graph. Under ZeRO-3 (a model built inside ``zero.Init``) this is what DeepSpeed's
    ``engine.compile()`` relies on too: its parameter gather (forward pre-hook) and release
    (forward hook) sit on every submodule, are ``torch.compiler.disable``d, and so split a
    compiled layer into one graph per stretch between submodule calls (the norm, RoPE with the
    attention, SwiGLU, the residual adds each fuse within their stretch); the compiled backward
    reads the parameters the pre-backward hooks gathered again, as eager autograd does.
    ``tests/distributed/test_compile_zero3.py`` checks loss and gradients against the eager
    layers at ZeRO-3, TP 1 and 2. One graph per layer (each layer a ZeRO-3 "leaf module", its
    parameters gathered at once) fails already without compile: DeepSpeed releases a leaf's
    parameters when the gradient of its input is done, before autograd has accumulated all of its
    weight gradients (``AccumulateGrad`` then meets a 0-size parameter). DeepCompile (``compile``
    in the DeepSpeed config) would put the gathers into the graph, but it compiles the whole
    model with its own backend and needs its CUDA op, so it is not used here.
    """
    count = 0
    for layer in model.decoder.layers:
        layer.forward = torch.compile(layer.forward, dynamic=False)
        count += 1
    return count


def use_fp32_rotary_frequencies(model, model_cfg: ModelConfig) -> int:
    """Recompute every rotary embedding's inverse frequencies in fp32; returns how many.

    Call it outside ``deepspeed.zero.Init``: that context converts every floating tensor created
    inside it to the engine dtype, so under bf16 megatron-core's ``inv_freq`` is born in bf16, and
    the positions it builds with ``arange(..., dtype=inv_freq.dtype)`` too. bf16 holds integers
    exactly only up to 256, so positions collapse in groups and RoPE angles at position 2047 are
    wrong by whole radians. The formula is megatron-core's (and HF Llama's), in fp32, with llama3
    scaling (:func:`~megatron_tinyllama.model.rope.rope_inv_freq`; linear scaling stays in the
    module's ``seq_len_interpolation_factor``).
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    inv_freq = rope_inv_freq(model_cfg.head_dim, model_cfg.rope_base, model_cfg.rope_scaling,
                             model_cfg.rope_scaling_factor)
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
