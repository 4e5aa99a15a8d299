"""CPU stand-ins for the few CUDA-only calls megatron-core makes, in a scoped, reversible context.

This module owns everything that lets megatron-core's layers run without a GPU. megatron-core
(checked against 0.16.1; the same call sites exist in 0.17-0.19) assumes a GPU in these places that
our model and training path reach:

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
   which we always set (:func:`megatron_tinyllama.model.build.build_transformer_config`).
4. megatron-core's distributed optimizer and DDP wrapper are CUDA-only; we do not use them
   (DeepSpeed owns optimizer and gradient reduction).

Nothing happens on import. :func:`cpu_shim` is a context manager: entering it without CUDA installs
the stand-ins, leaving the outermost entry puts back exactly the objects that were there; nested
entries share one installation; with CUDA it does nothing. The training entry
(:mod:`megatron_tinyllama.train.pretrain`) holds it for the whole run, tests through fixtures
(:func:`single_rank_cpu` adds a 1-rank gloo group), and
:func:`megatron_tinyllama.parallel.init.initialize_model_parallel` refuses to start on CPU outside
it (:func:`require_cpu_shim`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Any, Iterator

import torch

_ABSENT = object()
_lock = threading.Lock()
_depth = 0
"""How many :func:`cpu_shim` blocks are open (with or without CUDA)."""
_saved: list[tuple[Any, str, Any]] = []
"""(owner, attribute, original object or _ABSENT) for every replacement currently installed."""


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


def _replacements() -> list[tuple[Any, str, Any]]:
    """(owner, attribute, stand-in) for every megatron-core object the shim replaces."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import utils as mcore_transformer_utils
    from megatron.core.utils import GlobalMemoryBuffer

    return [
        (mcore_random, "_get_cuda_rng_state", _cpu_get_rng_state),
        (mcore_random, "_set_cuda_rng_state", _cpu_set_rng_state),
        (mcore_random, "_CUDA_RNG_STATE_TRACKER", CPURNGStatesTracker()),
        (mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True),
        (mcore_transformer_utils, "get_default_causal_mask", _cpu_default_causal_mask),
        # fused_softmax imported the function by name, so its reference is replaced too.
        (fused_softmax, "get_default_causal_mask", _cpu_default_causal_mask),
        (RotaryEmbedding, "get_emb", _on_cpu(RotaryEmbedding.get_emb)),
        (GlobalMemoryBuffer, "get_tensor", _on_cpu(GlobalMemoryBuffer.get_tensor)),
    ]


def _install() -> None:
    for owner, name, stand_in in _replacements():
        # vars(): the object defined on the owner itself (absent when inherited), so that
        # restoring puts back exactly what was there.
        _saved.append((owner, name, vars(owner).get(name, _ABSENT)))
        setattr(owner, name, stand_in)


def _restore() -> None:
    while _saved:
        owner, name, original = _saved.pop()
        if original is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, original)


@contextlib.contextmanager
def cpu_shim() -> Iterator[bool]:
    """Install the CPU stand-ins for the duration of the block when CUDA is absent.

    Yields:
        True if the stand-ins are active (no CUDA), False if CUDA is present (nothing changed).

    Re-entrant: an inner block shares the outer installation, and only the outermost exit
    restores the originals (also when the block raises).
    """
    global _depth
    with _lock:
        if _depth == 0 and not torch.cuda.is_available():
            _install()
        _depth += 1
        active = bool(_saved)
    try:
        yield active
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _restore()


def cpu_shim_active() -> bool:
    """Whether the stand-ins are installed (inside a :func:`cpu_shim` block, without CUDA)."""
    return bool(_saved)


def require_cpu_shim() -> bool:
    """Check that megatron-core can run here; returns True when on CPU (stand-ins active).

    Raises:
        RuntimeError: no CUDA and no open :func:`cpu_shim` block.
    """
    if torch.cuda.is_available():
        return False
    if not cpu_shim_active():
        raise RuntimeError(
            "no CUDA: megatron-core needs the CPU stand-ins; run inside "
            "megatron_tinyllama.parallel.cpu_shim.cpu_shim() (the training entry and the test "
            "fixtures do)"
        )
    return True



@contextlib.contextmanager
def single_rank_cpu(tensor_parallel_size: int = 1, seed: int = 1234) -> Iterator[None]:
    """A 1-rank gloo process group with megatron-core parallel state inside :func:`cpu_shim`,
    all torn down on exit.

    Mirrors the set-up/tear-down of megatron-core's own unit-test utilities, which are NCCL-only.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_tinyllama.parallel.init import initialize_model_parallel

    created = False
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        from megatron_tinyllama.launch import free_port

        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
        created = True
    try:
        with cpu_shim():
            try:
                initialize_model_parallel(tensor_parallel_size=tensor_parallel_size, seed=seed)
                yield
            finally:
                parallel_state.destroy_model_parallel()
    finally:
        if created:
            dist.destroy_process_group()
