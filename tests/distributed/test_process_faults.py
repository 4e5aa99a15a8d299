"""A rank that stops making progress (SIGSTOP, as a stuck NFS read or a hung GPU looks) ends the
job within ``train.stall_timeout_minutes``, named, with the last checkpoint intact."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.distributed.ranks import start_ranks
from tests.distributed.test_checkpoint_faults import _log_to, digest, recipe

pytestmark = pytest.mark.distributed


def _stalling_worker(rank, world_size, tree, log_path, stopped):
    """Rank ``stopped`` stops itself (SIGSTOP) at the first micro-batch of step 3."""
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.train import loop
    from tests.distributed.synthetic import synthetic_batches

    _log_to(Path(f"{log_path}.rank{rank}"))
    original, calls = loop.compute_loss, {"n": 0}

    def stalling(te, cfg, batch):
        calls["n"] += 1
        if rank == stopped and calls["n"] == 5:  # 2 micro-batches per step
            os.kill(os.getpid(), signal.SIGSTOP)
        return original(te, cfg, batch)

    loop.compute_loss = stalling
    loop.train(config_from_dict(tree), batch_source=synthetic_batches)


# Rank 0 also hosts the rendezvous store: its peers' calls to it then never return.
@pytest.mark.parametrize("stopped", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_stopped_rank_is_named_and_ends_the_job_within_the_stall_timeout(tmp_path, stopped):
    from megatron_tinyllama.train.watchdog import EXIT_STALLED

    save_dir = tmp_path / "run"
    tree = recipe(save_dir, 6)
    tree["train"]["stall_timeout_minutes"] = 0.05  # 3 s
    procs = start_ranks(_stalling_worker, 2, tree, str(tmp_path / "s.log"), stopped)
    waiting = 1 - stopped
    try:
        procs[waiting].join(timeout=150)
        assert procs[waiting].exitcode == EXIT_STALLED
        log = Path(f"{tmp_path / 's.log'}.rank{waiting}").read_text()
    finally:
        for proc in procs:  # the launcher's part: kill what is left (SIGKILL reaches a stopped one)
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=30)
    assert (f"rank {waiting}: no progress for 3 s (train.stall_timeout_minutes = 0.05 min): in step 3 "
            f"since") in log
    assert "last progress: step 2 finished at" in log
    if stopped == 1:  # its last heartbeat may predate step 3 (one every 0.5 s here)
        assert "rank 1: NOT RESPONDING (stopped, hung in the kernel or gone); its last heartbeat: " in log
    else:
        assert "the rendezvous store (hosted by rank 0's process) does not answer: rank 0 is stalled" in log
    assert f"exiting with status {EXIT_STALLED}" in log
    assert (save_dir / "latest").read_text() == "global_step000002"
    assert (save_dir / "global_step000002" / "trainer_state.json").is_file()
    assert digest(save_dir / "global_step000002")  # complete and readable
