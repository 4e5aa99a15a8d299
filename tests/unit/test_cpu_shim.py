"""The CPU stand-ins for megatron-core's CUDA-only calls."""

import torch

from megatron_tinyllama.parallel import cpu_shim


def test_shim_is_active_only_without_cuda():
    assert cpu_shim.apply_cpu_shim() is (not torch.cuda.is_available())


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
