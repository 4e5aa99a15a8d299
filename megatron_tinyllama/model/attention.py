"""Core attention that never materialises the S x S score matrix.

megatron-core's local ``DotProductAttention`` builds the full [b, heads, s, s] scores with baddbmm;
at TinyLlama's 1.1B shape that costs ~3x the throughput and twice the memory of a fused kernel.
This module is a drop-in ``core_attention`` for megatron-core's ``SelfAttention``: it takes the
same [s, b, heads, head_dim] tensors and returns [s, b, heads * head_dim], computed by

* ``flash_attn`` (flash-attn 2) when importable, on CUDA, in fp16/bf16;
* otherwise ``torch.nn.functional.scaled_dot_product_attention``, which picks its own flash or
  memory-efficient kernel on GPU and a blocked kernel on CPU.

Grouped-query attention either copies each K/V head for its query heads first (``gqa="repeat"``)
or lets the kernel read the shared heads in place (``"native"``: SDPA's ``enable_gqa``; flash-attn
always does). With a fused RoPE backend (``rope="compiled"`` or ``"liger"``), RoPE is applied here,
in one kernel per tensor, instead of by megatron-core's SelfAttention
(:class:`CoreRotarySelfAttention` then hands the queries and keys over unrotated); the angles come
from fp32 positions and fp32 inverse frequencies, the formula of megatron-core and HF Llama.

Attention is always causal over the whole (packed) sequence; arbitrary masks are not supported.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_tinyllama.model.rope import rotary_cos_sin  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

try:  # optional accelerator
    from flash_attn import flash_attn_func as _flash_attn_func

    HAVE_FLASH_ATTN = True
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = None
    HAVE_FLASH_ATTN = False

_REPORTED: set[str] = set()


def resolve_attention_backend(requested: str) -> str:
    """Map the config's ``attention_backend`` to what will actually run on this machine.

    Raises:
        RuntimeError: when ``flash_attn`` is requested but cannot run here.
    """
    if requested == "flash_attn":
        if not (HAVE_FLASH_ATTN and torch.cuda.is_available()):
            raise RuntimeError("model.attention_backend=flash_attn needs flash-attn and a CUDA device")
        return "flash_attn"
    if requested == "auto":
        return "flash_attn" if HAVE_FLASH_ATTN and torch.cuda.is_available() else "sdpa"
    return requested


def _report(backend: str) -> None:
    if backend not in _REPORTED:
        _REPORTED.add(backend)
        logger.info("attention backend: %s", backend)


@functools.lru_cache(maxsize=16)
def _cached_cos_sin(seq_len: int, head_dim: int, base: float, device: torch.device, scaling: str,
                    factor: float, inference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # ``inference`` keys the cache: a table made under inference_mode cannot be saved for backward.
    return rotary_cos_sin(seq_len, head_dim, base, device, scaling, factor)


def rope_table(seq_len: int, head_dim: int, base: float, device: torch.device,
               scaling: str = "none", factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~megatron_tinyllama.model.rope.rotary_cos_sin`, built once per shape and reused by
    every layer and every forward (it depends on no parameter). Inside torch.compile it is traced
    into the graph instead, where the compiler folds it."""
    if torch.compiler.is_compiling():
        return rotary_cos_sin(seq_len, head_dim, base, device, scaling, factor)
    return _cached_cos_sin(seq_len, head_dim, float(base), device, scaling, float(factor),
                           torch.is_inference_mode_enabled())


def apply_rope_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [s, b, heads, d] by fp32 ``cos``/``sin`` [s, 1, 1, d], in fp32, cast back once."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-second, first), dim=-1) * sin).to(x.dtype)


@functools.lru_cache(maxsize=None)
def compiled_rope():
    """:func:`apply_rope_fp32` as one torch.compile'd kernel (compiled on first use)."""
    return torch.compile(apply_rope_fp32, dynamic=False)


class CoreRotarySelfAttention(SelfAttention):
    """megatron-core's SelfAttention with RoPE left to core attention (a fused RoPE backend).

    Only the rotary embedding is withheld; the QKV projection, q/k norms, the output projection
    and everything else are megatron-core's.
    """

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs)


class FusedCoreAttention(MegatronModule):
    """Causal GQA attention through flash-attn or torch SDPA (see module docstring)."""

    requested_backend = "auto"
    rope: Optional[str] = None  # None: RoPE already applied by SelfAttention; "compiled" | "liger"
    rope_base = 10000.0
    rope_scaling = "none"
    rope_scaling_factor = 1.0
    gqa = "repeat"

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        **unused_kwargs,  # cp_comm_type, pg_collection, model_comm_pgs: differ across mcore versions
    ) -> None:
        super().__init__(config=config)
        self.backend = resolve_attention_backend(self.requested_backend)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        _report(self.backend)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        attn_mask_type=None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
        **unused_kwargs,
    ) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("FusedCoreAttention supports plain causal attention only")
        seq, batch, heads, head_dim = query.shape
        dropout = self.dropout_p if self.training else 0.0
        backend = self.backend
        if backend == "flash_attn" and query.dtype not in (torch.float16, torch.bfloat16):
            backend = "sdpa"  # flash-attn kernels are half precision only
        q, k, v = self._rotated_bhsd(query, key, value)  # [b, heads, s, d], views where possible
        if backend == "flash_attn":
            # flash-attn takes [b, s, heads, dim] and handles GQA (fewer kv heads) natively.
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            out = _flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=self.softmax_scale, causal=True)
            out = out.transpose(0, 1)  # [s, b, h, d]
        else:
            groups = k.shape[1]
            native = self.gqa == "native" and groups != heads
            if groups != heads and not native:
                # Query heads of one group are consecutive in megatron-core's layout (and HF's).
                k = k.repeat_interleave(heads // groups, dim=1)
                v = v.repeat_interleave(heads // groups, dim=1)
            extra = {"enable_gqa": True} if native else {}
            if backend == "math":
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                    out = F.scaled_dot_product_attention(
                        q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale, **extra
                    )
            else:
                out = F.scaled_dot_product_attention(
                    q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale, **extra
                )
            out = out.permute(2, 0, 1, 3)  # [s, b, h, d]
        return out.reshape(seq, batch, heads * head_dim)

    def _rotated_bhsd(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """q, k, v as [b, heads, s, d], with RoPE applied to q and k when this module owns it."""
        v = value.permute(1, 2, 0, 3)
        if self.rope is None:
            return query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), v
        cos, sin = rope_table(query.shape[0], query.shape[-1], self.rope_base, query.device,
                              self.rope_scaling, self.rope_scaling_factor)
        if self.rope == "liger":
            from liger_kernel.transformers.functional import liger_rope

            q, k = liger_rope(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3),
                              cos.unsqueeze(0), sin.unsqueeze(0))
            return q, k, v
        rope = compiled_rope()
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]
        return rope(query, cos, sin).permute(1, 2, 0, 3), rope(key, cos, sin).permute(1, 2, 0, 3), v


def core_attention_class(backend: str = "auto", *, rope: Optional[str] = None,
                         rope_base: float = 10000.0, gqa: str = "repeat",
                         rope_scaling: str = "none", rope_scaling_factor: float = 1.0) -> type:
    """A :class:`FusedCoreAttention` subclass bound to ``backend``, RoPE and GQA modes.

    megatron-core instantiates ``core_attention`` itself with a fixed set of keyword arguments
    (0.16 calls the class directly rather than through a ModuleSpec), so the choices travel as
    class attributes.

    Args:
        backend: "auto", "sdpa", "flash_attn" or "math".
        rope: None (megatron-core's SelfAttention applies RoPE), "compiled" or "liger".
        rope_base: RoPE base, used when ``rope`` is set.
        gqa: "repeat" or "native".
        rope_scaling, rope_scaling_factor: RoPE scaling (:mod:`megatron_tinyllama.model.rope`),
            used when ``rope`` is set.
    """
    resolve_attention_backend(backend)  # fail at spec time, not in the middle of model building
    if rope not in (None, "compiled", "liger") or gqa not in ("repeat", "native"):
        raise ValueError(f"core attention: unknown rope={rope!r} or gqa={gqa!r}")
    name = f"FusedCoreAttention_{backend}_{rope or 'mcore_rope'}_{gqa}"
    return type(name, (FusedCoreAttention,),
                {"requested_backend": backend, "rope": rope, "rope_base": float(rope_base), "gqa": gqa,
                 "rope_scaling": rope_scaling, "rope_scaling_factor": float(rope_scaling_factor)})
