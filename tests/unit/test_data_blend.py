"""Blend schedule: parsing, measured proportions, mixture warm-up, purity in (seed, index)."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_tinyllama.config import ConfigError, DataConfig
from megatron_tinyllama.data.blend import BlendSchedule, parse_blend


def test_parse_blend_forms():
    assert parse_blend(("0.7", "a", "0.3", "b")) == (["a", "b"], [0.7, 0.3])
    assert parse_blend("0.7 a 0.3 b") == (["a", "b"], [0.7, 0.3])
    assert parse_blend(("a",)) == (["a"], None)
    assert parse_blend(("a", "b")) == (["a", "b"], None)
    with pytest.raises(ValueError, match="empty"):
        parse_blend(())
    with pytest.raises(ValueError, match=">= 0"):
        parse_blend("-1 a 2 b")


def test_data_config_checks_blend_and_warmup_lengths():
    assert DataConfig(blend="0.7 a 0.3 b").blend == ("0.7", "a", "0.3", "b")
    with pytest.raises(ConfigError, match="start_weights has 1 weights for 2 datasets"):
        from megatron_tinyllama.config import MixtureWarmupConfig

        DataConfig(blend="0.7 a 0.3 b", mixture_warmup=MixtureWarmupConfig(start_weights=(1.0,)))


@pytest.mark.parametrize("seed", [0, 1234])
@pytest.mark.parametrize("start", [0, 987_654, 3_000_000_000])
def test_seven_three_blend_measures_within_one_percent_over_10k_samples(seed, start):
    schedule = BlendSchedule((0.7, 0.3), seq_length=2048, seed=seed)
    share = float(np.mean(schedule.dataset_index(start, start + 10_000) == 0))
    assert abs(share - 0.7) < 0.01
    assert abs(share - 0.7) < 0.002  # in fact far tighter: a low-discrepancy sequence


def test_three_way_blend_and_zero_weight():
    counts = np.bincount(BlendSchedule((5, 3, 2), 16, 7).dataset_index(0, 10_000), minlength=3)
    assert np.allclose(counts / 10_000, [0.5, 0.3, 0.2], atol=0.002)
    assert (BlendSchedule((1, 0), 16, 7).dataset_index(0, 1000) == 0).all()


def test_choice_is_a_pure_function_of_seed_and_index():
    schedule = BlendSchedule((0.7, 0.3), 128, 42)
    whole = schedule.dataset_index(0, 5000)
    parts = np.concatenate([schedule.dataset_index(a, min(a + 333, 5000)) for a in range(0, 5000, 333)])
    assert np.array_equal(whole, parts)
    assert not np.array_equal(whole, BlendSchedule((0.7, 0.3), 128, 43).dataset_index(0, 5000))


def test_positions_read_each_dataset_in_order_without_gaps_or_repeats():
    schedule = BlendSchedule((0.6, 0.4), 64, 3)
    dataset, position = schedule.assign(0, 3000)
    for k in range(2):
        assert position[dataset == k].tolist() == list(range(int((dataset == k).sum())))
    later_d, later_p = schedule.assign(1000, 3000)  # resuming at 1000 continues the counts
    assert np.array_equal(later_d, dataset[1000:]) and np.array_equal(later_p, position[1000:])
    assert schedule.counts_before(3000).tolist() == np.bincount(dataset).tolist()


def test_mixture_warmup_realised_proportions_follow_the_weights():
    seq = 100
    schedule = BlendSchedule((0.5, 0.5), seq, 11, start_weights=(0.9, 0.1),
                             warmup_start_tokens=2000 * seq, warmup_tokens=8000 * seq)
    chosen = schedule.dataset_index(0, 14_000)
    for start in range(0, 14_000, 1000):
        window = np.arange(start, start + 1000)
        expected = schedule.weights_at(window)[:, 0].mean()
        measured = float(np.mean(chosen[window] == 0))
        assert abs(measured - expected) < 0.01, (start, measured, expected)
    assert abs(np.mean(chosen[:2000] == 0) - 0.9) < 0.005  # before the stage starts
    assert abs(np.mean(chosen[10_000:] == 0) - 0.5) < 0.005  # after the warm-up
    weights = schedule.weights_at(np.array([0, 2000, 6000, 10_000, 12_000]))
    assert np.allclose(weights[:, 0], [0.9, 0.9, 0.7, 0.5, 0.5])


def test_invalid_schedules_are_refused():
    with pytest.raises(ValueError, match="start weights"):
        BlendSchedule((0.5, 0.5), 16, 0, start_weights=(1.0,))
    with pytest.raises(ValueError, match="positive sum"):
        BlendSchedule((0.0, 0.0), 16, 0)
