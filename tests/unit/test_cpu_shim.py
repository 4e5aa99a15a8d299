"""The CPU stand-ins for megatron-core's CUDA-only calls: scoped, reversible, CPU-only."""

import pytest
import torch

from megatron_tinyllama.parallel import cpu_shim

_ABSENT = object()


def _replaced_objects() -> dict[tuple[str, str], object]:
    """What megatron-core holds at every place the shim replaces (absent when inherited)."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import utils as mcore_transformer_utils
    from megatron.core.utils import GlobalMemoryBuffer

    places = [(mcore_random, "_get_cuda_rng_state"), (mcore_random, "_set_cuda_rng_state"),
              (mcore_random, "_CUDA_RNG_STATE_TRACKER"),
              (mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED"),
              (mcore_transformer_utils, "get_default_causal_mask"),
              (fused_softmax, "get_default_causal_mask"),
              (RotaryEmbedding, "get_emb"), (GlobalMemoryBuffer, "get_tensor")]
    return {(owner.__name__, name): vars(owner).get(name, _ABSENT) for owner, name in places}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-ins install only without CUDA")
def test_shim_is_scoped_nests_and_restores_exactly_the_originals():
    from megatron.core import tensor_parallel

    before = _replaced_objects()
    assert not cpu_shim.cpu_shim_active()
    with pytest.raises(RuntimeError, match="run inside megatron_tinyllama.parallel.cpu_shim"):
        cpu_shim.require_cpu_shim()
    with cpu_shim.cpu_shim() as active:
        assert active and cpu_shim.require_cpu_shim()
        inside = _replaced_objects()
        assert all(inside[key] is not before[key] for key in before)  # every place replaced
        assert isinstance(tensor_parallel.get_cuda_rng_tracker(), cpu_shim.CPURNGStatesTracker)
        with cpu_shim.cpu_shim() as nested:  # nested: shares the installation
            assert nested
            assert all(_replaced_objects()[key] is inside[key] for key in before)
        assert all(_replaced_objects()[key] is inside[key] for key in before)  # inner exit kept it
    after = _replaced_objects()
    assert [key for key in before if after[key] is not before[key]] == []
    assert not cpu_shim.cpu_shim_active()

    with pytest.raises(ValueError, match="boom"):  # an error inside the block restores too
        with cpu_shim.cpu_shim():
            raise ValueError("boom")
    after_error = _replaced_objects()
    assert all(after_error[key] is before[key] for key in before)


def test_shim_is_a_no_op_when_cuda_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = _replaced_objects()
    with cpu_shim.cpu_shim() as active:
        assert active is False and not cpu_shim.cpu_shim_active()
        assert cpu_shim.require_cpu_shim() is False  # with CUDA, megatron-core needs no stand-ins
        now = _replaced_objects()
        assert all(now[key] is before[key] for key in before)
    after = _replaced_objects()
    assert all(after[key] is before[key] for key in before)


def test_mcore_cpu_fixture_holds_the_shim(mcore_cpu):
    assert cpu_shim.cpu_shim_active() is (not torch.cuda.is_available())


def test_rng_tracker_fork_is_reproducible_and_leaves_the_outer_stream_alone():
    tracker = cpu_shim.CPURNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(5)
    outer_expected = torch.rand(3)
    torch.manual_seed(5)
    with tracker.fork():
        first = torch.rand(3)
    outer = torch.rand(3)
    torch.testing.assert_close(outer, outer_expected)  # the fork did not consume the outer stream
    with tracker.fork():
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the forked stream advanced
    fresh = cpu_shim.CPURNGStatesTracker()
    fresh.add("model-parallel-rng", 123)
    with fresh.fork():
        torch.testing.assert_close(torch.rand(3), first)
    states = tracker.get_states()
    tracker.set_states(states)
    with tracker.fork():
        third = torch.rand(3)
    with fresh.fork():
        torch.testing.assert_close(torch.rand(3), second)


def test_megatron_sees_the_cpu_tracker_and_mask(mcore_cpu):
    from megatron.core import tensor_parallel
    from megatron.core.transformer import utils

    assert isinstance(tensor_parallel.get_cuda_rng_tracker(), cpu_shim.CPURNGStatesTracker)
    mask = utils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert mask.tolist()[0] == [False, True, True, True]
