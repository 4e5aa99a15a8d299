"""Which kernel runs each fusable piece of the model: the recipe's request, resolved on this machine.

This module owns the choice, not the kernels. Each lever is a :class:`ModelConfig` field whose
default, ``auto``, picks the fastest backend that can run here; a backend that was asked for but
cannot run (its library or the library's compiled part is missing, or it needs CUDA) falls back
to the plain path, and the log says so. Optional libraries (liger-kernel, Transformer Engine, apex) are imported only here and
only when they could be used, so a CPU machine without them never touches them.

``auto`` resolves as follows (one line per lever is logged, e.g. ``norm backend: compiled``):

* Without CUDA everything stays on the plain path: CPU runs are for correctness, and tests pin
  each backend explicitly.
* ``torch_compile``: ``layers`` on CUDA at ZeRO 0-2; none under ZeRO-3, where the single-op kernels
  below run instead. Compiled layers work under ZeRO-3 (DeepSpeed's parameter hooks split each
  layer at its submodules, :func:`megatron_tinyllama.model.build.compile_layers`, and
  tests/distributed/test_compile_zero3.py checks them against eager layers), but on the first GPU
  run they were the slower choice: TinyLlama 1.1B, bf16, micro-batch 8 on one H200, ZeRO-3 compiled
  43.1k tokens/s against 57.7k eager with the kernels (1.34x), while at ZeRO-1 compiled layers were
  the faster (70.3k against 68.5k; benchmarks/results/throughput_h200.json). That run's log shows
  dynamo reaching its recompile limit on DeepSpeed's hooks (``_pre_backward_module_hook``, once per
  submodule type), the likely cost. ``torch_compile: layers`` still compiles under ZeRO-3 when asked.
* With compiled layers, norm, SwiGLU and RoPE stay plain torch inside the layer: inductor fuses
  them with their neighbours (residual adds included), better than any one-op kernel.
* Otherwise on CUDA: norm Transformer Engine > apex > liger > compiled; SwiGLU megatron-core's
  fused kernel; RoPE liger > compiled.
* ``cross_entropy_backend``: the reported loss must be an fp32 mean whatever the kernel (the
  scaling fits and the reference tests read it), so that rule comes first and speed second:
  chunked on CUDA (fp32 statistics, never an fp32 copy of the logits). liger's kernel sums
  per-token losses in bf16 and synchronises the host (``.item()``), so ``auto`` never picks it;
  asked for, it runs, and the loss it reports is recomputed in fp32 (model/loss.py).
* ``gqa_backend``: native on CUDA (SDPA ``enable_gqa`` and flash-attn read the shared K/V heads
  in place).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_tinyllama.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelPlan:
    """The backend each lever resolved to on this machine (what actually runs)."""

    norm: str = "torch"
    """torch | compiled | liger | te | apex"""
    swiglu: str = "torch"
    """torch | fused (megatron-core's jit-fused SwiGLU)"""
    rope: str = "torch"
    """torch (megatron-core's, applied by SelfAttention) | compiled | liger (in core attention)"""
    cross_entropy: str = "plain"
    """plain | chunked | megatron_fused | liger"""
    gqa: str = "repeat"
    """repeat (K/V heads copied) | native"""
    compile_layers: bool = False
    """torch.compile of every transformer layer."""

    def describe(self) -> dict[str, str]:
        return {"norm": self.norm, "swiglu": self.swiglu, "rope": self.rope,
                "cross_entropy": self.cross_entropy, "gqa": self.gqa,
                "torch_compile": "layers" if self.compile_layers else "none"}


def module_available(name: str) -> bool:
    """Whether ``name`` imports (any error counts as no: a broken CUDA build is as good as none)."""
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - ImportError, OSError from missing .so, RuntimeError, ...
        return False
    return True


# A backend is available only if its compiled part loads, not just its Python package: apex's
# ``apex.normalization`` imports without its CUDA extension and only loads ``fused_layer_norm_cuda``
# inside forward (a Python-only apex install then crashes the first step); Transformer Engine's
# kernels are the ``transformer_engine_torch`` extension; liger's are Triton JIT kernels.
_COMPILED_PARTS = {
    "liger": ("liger_kernel.transformers.functional", "triton"),
    "te": ("transformer_engine.pytorch", "transformer_engine_torch",
           "megatron.core.extensions.transformer_engine"),
    "apex": ("apex.normalization", "fused_layer_norm_cuda"),
}


def backend_loads(backend: str) -> bool:
    """Whether ``backend``'s Python package and its compiled part all import here (CUDA needed)."""
    return torch.cuda.is_available() and all(module_available(m) for m in _COMPILED_PARTS[backend])


def _liger_ok() -> bool:
    return backend_loads("liger")


def _te_ok() -> bool:
    return backend_loads("te")


def _apex_ok() -> bool:
    return backend_loads("apex")


def _native_gqa_ok() -> bool:
    try:
        q = torch.zeros(1, 2, 1, 2)
        kv = torch.zeros(1, 1, 1, 2)
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except TypeError:
        return False
    return True


_AVAILABLE = {
    "norm": {"torch": lambda: True, "compiled": lambda: True, "liger": _liger_ok, "te": _te_ok,
             "apex": _apex_ok},
    "swiglu": {"torch": lambda: True, "fused": lambda: True},
    "rope": {"torch": lambda: True, "compiled": lambda: True, "liger": _liger_ok},
    "cross_entropy": {"plain": lambda: True, "chunked": lambda: True, "megatron_fused": lambda: True,
                      "liger": _liger_ok},
    "gqa": {"repeat": lambda: True, "native": _native_gqa_ok},
}
_PLAIN = {"norm": "torch", "swiglu": "torch", "rope": "torch", "cross_entropy": "plain", "gqa": "repeat"}


def _pick(lever: str, requested: str, auto_order: list[str]) -> tuple[str, str]:
    """(backend, why) for one lever."""
    available = _AVAILABLE[lever]
    if requested != "auto":
        if available[requested]():
            return requested, "requested"
        fallback = _PLAIN[lever]
        logger.warning("%s backend: %s requested but cannot run here (needs CUDA and its library); "
                       "falling back to %s", lever.replace("_", "-"), requested, fallback)
        return fallback, f"fallback from {requested}"
    for candidate in auto_order:
        if available[candidate]():
            return candidate, "auto"
    return _PLAIN[lever], "auto"


def resolve_kernels(model_cfg: ModelConfig, *, precision: str = "fp32", tensor_parallel_size: int = 1,
                    zero_stage: int = 0, cuda: Optional[bool] = None, log: bool = True) -> KernelPlan:
    """Resolve every lever of ``model_cfg`` for this machine and job; logs one line per lever.

    Args:
        model_cfg: the recipe's model section (``*_backend`` and ``torch_compile`` fields).
        precision: the engine's precision; megatron-core's fused cross-entropy returns bf16
            gradients, so it is refused (falls back to chunked) outside bf16.
        tensor_parallel_size: liger's cross-entropy sees one vocabulary slice only: TP=1.
        zero_stage: the ZeRO stage: ``auto`` compiles layers below ZeRO-3 only.
        cuda: override device detection (tests).
    """
    on_cuda = torch.cuda.is_available() if cuda is None else cuda
    # auto: compiled layers except under ZeRO-3, where they measured slower (module docstring).
    compile_layers = model_cfg.torch_compile == "layers" or (
        model_cfg.torch_compile == "auto" and on_cuda and zero_stage < 3)
    if on_cuda and not compile_layers:
        norm_order, swiglu_order, rope_order = ["te", "apex", "liger", "compiled"], ["fused"], ["liger", "compiled"]
    else:  # inside a compiled layer, plain torch ops fuse with their neighbours
        norm_order, swiglu_order, rope_order = ["torch"], ["torch"], ["torch"]
    ce_order = ["chunked"] if on_cuda else ["plain"]  # never liger: see the module docstring
    gqa_order = ["native"] if on_cuda else ["repeat"]

    choices, why = {}, {}
    for lever, order in (("norm", norm_order), ("swiglu", swiglu_order), ("rope", rope_order),
                         ("cross_entropy", ce_order), ("gqa", gqa_order)):
        requested = getattr(model_cfg, f"{lever}_backend")
        choices[lever], why[lever] = _pick(lever, requested, order)
    if model_cfg.normalization != "RMSNorm" and choices["norm"] in ("liger", "compiled"):
        choices["norm"], why["norm"] = "torch", f"{choices['norm']} is RMSNorm only"
    if choices["cross_entropy"] == "liger" and tensor_parallel_size > 1:
        choices["cross_entropy"], why["cross_entropy"] = "chunked", "liger needs TP=1"
    if choices["cross_entropy"] == "megatron_fused" and precision != "bf16":
        choices["cross_entropy"], why["cross_entropy"] = "chunked", "megatron_fused returns bf16 gradients"
    plan = KernelPlan(norm=choices["norm"], swiglu=choices["swiglu"], rope=choices["rope"],
                      cross_entropy=choices["cross_entropy"], gqa=choices["gqa"],
                      compile_layers=compile_layers)
    if log:
        for lever in ("norm", "swiglu", "rope", "cross_entropy", "gqa"):
            logger.info("%s backend: %s (%s)", lever.replace("_", "-"), choices[lever], why[lever])
        logger.info("torch.compile: %s (%s)", "layers" if compile_layers else "none",
                    "requested" if model_cfg.torch_compile != "auto" else "auto")
    return plan


PLAIN_PLAN = KernelPlan()
"""Every lever on its plain path: what the stack computed before the levers existed."""
