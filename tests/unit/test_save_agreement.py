"""The ranks' agreement before a checkpoint save writes (checkpoint.saving._agree_on_save), in one
process: the decision each rank takes from the all-reduced facts."""

import datetime

import pytest
import torch.distributed as dist

from megatron_tinyllama.checkpoint.saving import RETRY, SKIP, _agree_on_save, _SignalHold


@pytest.fixture()
def group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_a_stop_save_is_skipped_only_when_the_step_before_was_saved_at_the_signal(group):
    agree = lambda step, durable, signal_saved, may_skip: _agree_on_save(  # noqa: E731
        group, step, durable, signal_saved, may_skip, lambda: True)
    assert agree(5, 4, True, True) == SKIP
    assert agree(5, 4, True, False) == "write"   # the end of the run: always written
    assert agree(5, 4, False, True) == "write"   # the step before was an ordinary save
    assert agree(5, 3, True, True) == "write"    # older than the step before


def test_a_signal_save_whose_update_went_on_is_not_written(group):
    hold = _SignalHold(4)
    hold.before_update(0.01)  # nobody joined in time: the update goes on
    assert hold.gave_up and not hold.commit()
    assert _agree_on_save(group, 4, 3, False, False, hold.commit) == RETRY
    held = _SignalHold(4)
    assert _agree_on_save(group, 4, 3, False, False, held.commit) == "write" and held.committed
