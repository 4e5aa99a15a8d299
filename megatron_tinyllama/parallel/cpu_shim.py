"""CPU stand-ins for the few CUDA-only calls megatron-core makes, applied only without CUDA.

megatron-core (checked against 0.16.1; the same call sites exist in 0.17-0.19) assumes a GPU in
these places that our model and training path reach:

1. ``tensor_parallel.random`` keeps per-purpose RNG streams in a tracker built on
   ``torch.cuda.get_rng_state``/``manual_seed`` (used by dropout forks and by activation
   recomputation, which replays the forward with the saved "CUDA" RNG state).
   -> :class:`CPURNGStatesTracker` and CPU versions of ``_get_cuda_rng_state``/``_set_cuda_rng_state``.
2. megatron's own unfused ``DotProductAttention`` (only our baseline in tests and benchmarks) takes
   the default causal mask from ``transformer.utils.get_default_causal_mask``, built with
   ``device="cuda"``, and its score buffer from ``GlobalMemoryBuffer.get_tensor`` on
   ``torch.cuda.current_device()`` -> the same mask on the CPU; the buffer call wrapped as in 3.
3. ``RotaryEmbedding.get_emb`` moves its inverse frequencies to ``torch.cuda.current_device()`` on
   the first forward -> wrapped so that, inside it only, the current device is the CPU.
   Layer initialisation calls ``current_device()`` too unless ``use_cpu_initialization`` is set,
   which we always set without CUDA (:func:`megatron_tinyllama.model.build.build_transformer_config`).
4. megatron-core's distributed optimizer and DDP wrapper are CUDA-only; we do not use them
   (DeepSpeed owns optimizer and gradient reduction).

Nothing happens on import. :func:`apply_cpu_shim` is idempotent and a no-op when CUDA is present;
:func:`single_rank_cpu` is a context manager for tests and tools that need a 1-rank gloo group.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from typing import Iterator

import torch

_APPLIED = False


class CPURNGStatesTracker:
    """Named CPU RNG streams with the interface of megatron-core's ``CudaRNGStatesTracker``."""

    def __init__(self, *args, **kwargs) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def _cpu_get_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


@functools.lru_cache(maxsize=None)
def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


@contextlib.contextmanager
def _current_device_is_cpu() -> Iterator[None]:
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.current_device = original


def _on_cpu(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with _current_device_is_cpu():
            return method(*args, **kwargs)

    wrapper.__wrapped_by_cpu_shim__ = True
    return wrapper


def apply_cpu_shim() -> bool:
    """Install the CPU stand-ins when CUDA is absent. Returns True if the shim is active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.utils import GlobalMemoryBuffer
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import utils as mcore_transformer_utils

    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    mcore_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_transformer_utils.get_default_causal_mask = _cpu_default_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_default_causal_mask
    for owner, name in ((RotaryEmbedding, "get_emb"), (GlobalMemoryBuffer, "get_tensor")):
        if not getattr(getattr(owner, name), "__wrapped_by_cpu_shim__", False):
            setattr(owner, name, _on_cpu(getattr(owner, name)))
    _APPLIED = True
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def single_rank_cpu(tensor_parallel_size: int = 1, seed: int = 1234) -> Iterator[None]:
    """A 1-rank gloo process group with megatron-core parallel state, torn down on exit.

    Mirrors the set-up/tear-down of megatron-core's own unit-test utilities, which are NCCL-only.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_tinyllama.parallel.init import initialize_model_parallel

    created = False
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
        created = True
    try:
        initialize_model_parallel(tensor_parallel_size=tensor_parallel_size, seed=seed)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
