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


def _stalling_worker(rank, world_size, tree, log_path):
    """Rank 1 stops itself (SIGSTOP) at the first micro-batch of step 3."""
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.train import loop
    from tests.distributed.synthetic import synthetic_batches

    _log_to(Path(f"{log_path}.rank{rank}"))
    original, calls = loop.compute_loss, {"n": 0}

    def stalling(te, cfg, batch):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 5:  # 2 micro-batches per step
            os.kill(os.getpid(), signal.SIGSTOP)
        return original(te, cfg, batch)

    loop.compute_loss = stalling
    loop.train(config_from_dict(tree), batch_source=synthetic_batches)


def test_a_stopped_rank_is_named_and_ends_the_job_within_the_stall_timeout(tmp_path):
    from megatron_tinyllama.train.watchdog import EXIT_STALLED

    save_dir = tmp_path / "run"
    tree = recipe(save_dir, 6)
    tree["train"]["stall_timeout_minutes"] = 0.05  # 3 s
    procs = start_ranks(_stalling_worker, 2, tree, str(tmp_path / "s.log"))
    try:
        procs[0].join(timeout=150)
        assert procs[0].exitcode == EXIT_STALLED
        log = Path(f"{tmp_path / 's.log'}.rank0").read_text()
    finally:
        for proc in procs:  # the launcher's part: kill what is left (SIGKILL reaches a stopped one)
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=30)
    assert "rank 0: no progress for 3 s (train.stall_timeout_minutes = 0.05 min): in step 3 since" in log
    assert "last progress: step 2 finished at" in log
    # Its last heartbeat may predate step 3 (one every 0.5 s here).
    assert "rank 1: NOT RESPONDING (stopped, hung in the kernel or gone); its last heartbeat: " in log
    assert f"exiting with status {EXIT_STALLED}" in log
    assert (save_dir / "latest").read_text() == "global_step000002"
    assert (save_dir / "global_step000002" / "trainer_state.json").is_file()
    assert digest(save_dir / "global_step000002")  # complete and readable
