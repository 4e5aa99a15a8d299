"""The normalisation modules the layer spec can use, one per ``norm_backend``.

This module owns turning a resolved norm backend (:mod:`megatron_tinyllama.model.kernels`) into a
class megatron-core can build with ``(config, hidden_size, eps)``. Every class keeps the parameter
name ``weight`` (and ``bias`` for LayerNorm), so checkpoints and the HF key map do not care which
one ran. All RMSNorms compute what ``torch.nn.RMSNorm`` (and HF Llama) computes: the
normalisation in fp32, the result cast back to the input dtype, then scaled by the weight.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch.nn.RMSNorm's arithmetic written out (fp32 statistics, cast, then the weight)."""
    x_fp32 = x.float()
    normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


@functools.lru_cache(maxsize=None)
def compiled_rms_norm():
    """:func:`rms_norm_reference` through torch.compile: one fused kernel forward, one backward.

    Compiled on first use (never at import); inductor needs a C++ compiler on CPU, Triton on GPU.
    """
    return torch.compile(rms_norm_reference, dynamic=False)


class _RMSNormBase(torch.nn.Module):
    """An RMSNorm with megatron-core's constructor signature and a ``weight`` parameter."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        # megatron-core's convention: a norm weight is replicated over TP ranks (and reduced
        # across them only under sequence parallelism, which this stack does not use).
        setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class CompiledRMSNorm(_RMSNormBase):
    """RMSNorm as one torch.compile'd kernel (works on CPU too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return compiled_rms_norm()(x, self.weight, self.eps)


class LigerRMSNorm(_RMSNormBase):
    """liger-kernel's Triton RMSNorm with Llama casting (CUDA only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from liger_kernel.transformers.functional import liger_rms_norm

        # in_place=False: megatron-core may keep references to the incoming gradient.
        return liger_rms_norm(x, self.weight, self.eps, offset=0.0, casting_mode="llama", in_place=False)


class ApexRMSNorm(_RMSNormBase):
    """NVIDIA apex's fused RMSNorm (CUDA only; apex is never the PyPI package of that name)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine

        return fused_rms_norm_affine(x, self.weight, self.weight.shape, self.eps)


def norm_class(normalization: str, backend: str) -> type:
    """The class megatron-core builds for each norm of the layer.

    Args:
        normalization: "RMSNorm" or "LayerNorm".
        backend: a resolved ``norm_backend`` (never "auto").
    """
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    if normalization == "LayerNorm":
        if backend == "apex":
            from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

            return FusedLayerNorm
        return WrappedTorchNorm
    return {"torch": WrappedTorchNorm, "compiled": CompiledRMSNorm, "liger": LigerRMSNorm,
            "apex": ApexRMSNorm}[backend]
