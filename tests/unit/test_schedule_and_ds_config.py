"""LR schedule by tokens (incl. TinyLlama issue #27) and the DeepSpeed config built from a recipe."""

import pytest

from megatron_tinyllama.config import ConfigError, OptimizerConfig, config_from_dict
from megatron_tinyllama.engine.ds_config import batch_geometry, build_ds_config
from megatron_tinyllama.train.schedule import learning_rate


def test_cosine_peaks_at_end_of_warmup_never_rises_after_and_ends_at_min():
    """Regression test for TinyLlama's issue #27 (min LR equal to max: nothing decayed)."""
    opt = OptimizerConfig(lr=4e-4, min_lr=4e-5, warmup_tokens=2000)
    total = 20000
    lrs = [learning_rate(t, opt, total) for t in range(0, total + 1, 50)]
    peak_index = max(range(len(lrs)), key=lrs.__getitem__)
    assert peak_index * 50 == 2000 and lrs[peak_index] == pytest.approx(4e-4)
    after = lrs[peak_index:]
    assert all(b <= a + 1e-15 for a, b in zip(after, after[1:]))
    assert lrs[-1] == pytest.approx(4e-5)
    assert learning_rate(10 * total, opt, total) == pytest.approx(4e-5)
    assert lrs[0] == 0.0 and lrs[20] == pytest.approx(2e-4)  # linear warm-up
    assert after[len(after) // 2] < 4e-4 * 0.9  # it really decays


def test_schedule_by_tokens_is_independent_of_batch_size():
    opt = OptimizerConfig(lr=1.0, min_lr=0.1, warmup_tokens=1000)
    small = [learning_rate(t, opt, 10000) for t in range(0, 10001, 500)]
    large = [learning_rate(t, opt, 10000) for t in range(0, 10001, 2000)]
    assert large == small[::4]


def test_min_lr_above_lr_is_refused():
    with pytest.raises(ConfigError, match="min_lr"):
        OptimizerConfig(lr=1e-4, min_lr=4e-4)


def _cfg(**train):
    return config_from_dict({"model": {"preset": "tinyllama-1.1b"}, "train": train})


def test_two_million_token_batch_splits_into_micro_batches():
    geometry = batch_geometry(_cfg(global_batch_tokens=2097152, micro_batch_size=8), data_parallel_size=64)
    assert (geometry.global_batch_size, geometry.gradient_accumulation_steps) == (1024, 2)


def test_batch_that_does_not_split_names_the_numbers():
    with pytest.raises(ConfigError, match=r"micro_batch_size=8 x 24 data-parallel ranks.*multiple of 393216 tokens"):
        batch_geometry(_cfg(global_batch_tokens=2097152, micro_batch_size=8), data_parallel_size=24)


def test_ds_config_copies_the_recipe_and_sets_hpz_from_the_local_world():
    cfg = config_from_dict({"model": {"preset": "tinyllama-1.1b"},
                            "parallel": {"hpz_partition_size": 0, "zero_stage": 3},
                            "train": {"global_batch_tokens": 1835008, "micro_batch_size": 7, "precision": "bf16"}})
    ds = build_ds_config(cfg, data_parallel_size=64, local_world_size=4)
    assert ds["train_batch_size"] == 896 and ds["train_micro_batch_size_per_gpu"] == 7
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["zero_hpz_partition_size"] == 4
    assert not any(k.startswith("_") for k in ds)  # comments stripped


def _hpz_cfg(hpz: int, tp: int):
    return config_from_dict({"model": {"preset": "tinyllama-1.1b"},
                             "parallel": {"hpz_partition_size": hpz, "tensor_parallel_size": tp, "zero_stage": 3},
                             "train": {"global_batch_tokens": 2097152, "micro_batch_size": 8,
                                       "precision": "bf16"}})


def test_bf16_accumulates_and_reduces_gradients_in_fp32():
    ds = build_ds_config(_hpz_cfg(1, 1), data_parallel_size=64, local_world_size=4)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    fp32 = build_ds_config(_cfg(global_batch_tokens=2097152, micro_batch_size=8, precision="fp32"), 64, 4)
    assert "data_types" not in fp32 and "communication_data_type" not in fp32


def test_node_local_sharding_with_tensor_parallelism_counts_data_parallel_ranks_per_node():
    # 16 nodes x 4 GPUs at TP=2: a node holds 2 ranks of each data-parallel group (of 32).
    ds = build_ds_config(_hpz_cfg(0, 2), data_parallel_size=32, local_world_size=4)
    assert ds["zero_optimization"]["zero_hpz_partition_size"] == 2


def test_node_local_sharding_is_off_where_it_can_only_cost(caplog):
    import logging

    with caplog.at_level(logging.INFO):
        one_node = build_ds_config(_hpz_cfg(0, 1), data_parallel_size=8, local_world_size=8)
        one_per_node = build_ds_config(_hpz_cfg(0, 2), data_parallel_size=8, local_world_size=2)
    assert "zero_hpz_partition_size" not in one_node["zero_optimization"]
    assert "zero_hpz_partition_size" not in one_per_node["zero_optimization"]
    assert "one node holds the whole data-parallel group" in caplog.text
    assert "nothing to shard within it" in caplog.text


def test_node_local_block_must_hold_whole_tp_groups():
    with pytest.raises(ConfigError, match="multiple of parallel.tensor_parallel_size=2"):
        build_ds_config(_hpz_cfg(3, 2), data_parallel_size=8, local_world_size=4)


def test_node_local_groups_are_per_node_and_tp_rank():
    from megatron_tinyllama.parallel.init import node_local_groups

    assert node_local_groups(16, 2, 4) == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11],
                                           [12, 14], [13, 15]]
    assert node_local_groups(8, 1, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ConfigError):
        node_local_groups(12, 2, 8)


def test_plain_zero3_has_no_hpz():
    ds = build_ds_config(_hpz_cfg(1, 1), 64, 4)
    assert "zero_hpz_partition_size" not in ds["zero_optimization"]


@pytest.mark.parametrize("zero_stage,hpz", [(1, 1), (3, 1), (3, 0)])
def test_every_built_config_turns_off_deepspeeds_synchronising_throughput_timer(zero_stage, hpz, monkeypatch):
    """No dataloader is handed to DeepSpeed, so engine.forward/step start and stop its throughput
    timer on every micro-batch; with ``timers.throughput.synchronized`` (DeepSpeed's default) each
    call synchronises the device. Checked with DeepSpeed's own config parser and timer."""
    from deepspeed.utils.config import get_timers_config
    from deepspeed.utils.timer import ThroughputTimer

    cfg = config_from_dict({"model": {"preset": "tinyllama-1.1b"},
                            "parallel": {"zero_stage": zero_stage, "hpz_partition_size": hpz},
                            "train": {"global_batch_tokens": 2097152, "micro_batch_size": 8,
                                      "precision": "bf16"}})
    ds = build_ds_config(cfg, data_parallel_size=16, local_world_size=8)
    timers = get_timers_config(ds)
    assert not timers.synchronized and not timers.enabled
    assert not ds.get("wall_clock_breakdown", False)

    import deepspeed.utils.timer as ds_timer

    syncs = []
    accelerator = ds_timer.get_accelerator()
    monkeypatch.setattr(accelerator, "synchronize", lambda *a, **k: syncs.append(1))
    timer = ThroughputTimer(timers, batch_size=8, start_step=0)
    for step in range(6):  # forward (start) and step (stop) of six micro-batches
        timer.start()
        timer.stop(global_step=step % 2 == 1)
    assert syncs == []
