"""A rank that stops making progress (SIGSTOP, as a stuck NFS read or a hung GPU looks), or one alive
that never enters the step's collective, ends the job within ``train.stall_timeout_minutes``, named,
with the last checkpoint intact."""

from __future__ import annotations

import os
import pickle
import signal
import time
from pathlib import Path

import pytest

from tests.distributed.ranks import start_ranks
from tests.distributed.test_checkpoint_faults import _log_to, digest, recipe

pytestmark = pytest.mark.distributed


def _stalling_worker(rank, world_size, tree, log_path, stopped, how="stop"):
    """Rank ``stopped`` stops itself (SIGSTOP) at the first micro-batch of step 3, or (``how`` =
    "sleep") sleeps there, alive: its heartbeat thread beats, its main thread never reaches the
    step's collective."""
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.parallel.init import set_collective_env
    from megatron_tinyllama.train import loop
    from tests.distributed.synthetic import synthetic_batches

    _log_to(Path(f"{log_path}.rank{rank}"))
    set_collective_env(tree["checkpoint"]["save_dir"])  # as the training entry does
    original, calls = loop.compute_loss, {"n": 0}

    def stalling(te, cfg, batch):
        calls["n"] += 1
        if rank == stopped and calls["n"] == 5:  # 2 micro-batches per step
            if how == "sleep":
                time.sleep(120)
            else:
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
    # Step 2's save written before step 3 begins: a process frozen while its background write is
    # in flight loses that write (the checkpoint before it stays 'latest'; the kill test in
    # test_training shows that case), and here there is none before it.
    tree["checkpoint"]["background_save"] = False
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


def test_a_rank_alive_but_outside_the_collective_is_named_with_where_it_is(tmp_path):
    """Rank 1 sleeps in its step, its heartbeat beating (a rank stuck in a save, in data loading or
    in D state looks so); rank 0 waits in the step's collective. The report (one, from rank 0)
    names rank 1 as the one holding the job, the collective rank 0 is in, and where rank 1 is."""
    from megatron_tinyllama.parallel.init import FLIGHT_RECORDER_DIR
    from megatron_tinyllama.train.watchdog import EXIT_STALLED

    save_dir = tmp_path / "run"
    tree = recipe(save_dir, 6)
    tree["train"]["stall_timeout_minutes"] = 0.05  # 3 s
    procs = start_ranks(_stalling_worker, 2, tree, str(tmp_path / "s.log"), 1, "sleep")
    began = time.monotonic()
    try:
        for proc in procs:
            proc.join(timeout=90)
        took = time.monotonic() - began
        assert [proc.exitcode for proc in procs] == [EXIT_STALLED, EXIT_STALLED]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=30)
    log0 = Path(f"{tmp_path / 's.log'}.rank0").read_text()
    log1 = Path(f"{tmp_path / 's.log'}.rank1").read_text()
    assert "rank 0: no progress for 3 s (train.stall_timeout_minutes = 0.05 min): in step 3" in log0
    assert "; waiting in collective #" in log0  # rank 0's own line: the collective it is in
    assert "rank 1: alive, in step 3 since" in log0 and "not in a collective" in log0
    assert "holding up the job: rank 1 has not entered collective #" in log0
    assert "its main thread is at tests/distributed/test_process_faults.py:" in log0
    assert "in stalling" in log0
    # Rank 1 reports itself and points at rank 0's report instead of reading every heartbeat.
    assert "rank 1: no progress for" in log1 and "rank 0's log names the ranks that stalled" in log1
    assert "holding up the job" not in log1
    # Each rank's flight recorder, as PyTorch's analyser reads it: rank 0 has one more collective.
    dumps = {r: pickle.loads((save_dir / FLIGHT_RECORDER_DIR / f"rank_{r}").read_bytes()) for r in (0, 1)}
    last = {r: max(e["collective_seq_id"] for e in d["entries"] if e["pg_id"] == 0)
            for r, d in dumps.items() if any(e["pg_id"] == 0 for e in d["entries"])}
    assert last.get(0, 0) >= last.get(1, 0)
    assert took < 60, took  # caught within the timeout and the report, not the process-group timeout


def _node_lost_worker(rank, world_size, tree, log_path):
    """One rank per simulated node; rank 1's node is lost (SIGKILL: no handler, no goodbye) at
    the first micro-batch of step 3."""
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.train import loop
    from tests.distributed.synthetic import synthetic_batches

    _log_to(Path(f"{log_path}.rank{rank}"))
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")  # as a launcher of 1-rank nodes sets
    original, calls = loop.compute_loss, {"n": 0}

    def losing(te, cfg, batch):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 5:
            time.sleep(1.5)  # its heartbeat has published step 3
            os.kill(os.getpid(), signal.SIGKILL)
        return original(te, cfg, batch)

    loop.compute_loss = losing
    loop.train(config_from_dict(tree), batch_source=synthetic_batches)


def test_a_lost_node_is_named_by_the_survivor_which_exits_with_the_peer_lost_status(tmp_path):
    from megatron_tinyllama.train.watchdog import EXIT_PEER_LOST

    save_dir = tmp_path / "run"
    tree = recipe(save_dir, 6)
    tree["train"]["stall_timeout_minutes"] = 0.1  # 6 s: the loss is seen at once, not by the timer
    procs = start_ranks(_node_lost_worker, 2, tree, str(tmp_path / "n.log"))
    try:
        for proc in procs:
            proc.join(timeout=90)
        assert [proc.exitcode for proc in procs] == [EXIT_PEER_LOST, -signal.SIGKILL]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=30)
    log = Path(f"{tmp_path / 'n.log'}.rank0").read_text()
    assert "rank 0: a peer is gone, in step 3: Connection closed by peer [127.0.0.1]:" in log
    assert f"rank 1 (node 1, host {os.uname().nodename}) lost: its last heartbeat: step 3, begun" in log
    assert f"exiting with status {EXIT_PEER_LOST}; the last complete checkpoint is intact" in log
    assert "Traceback" not in log
    assert (save_dir / "global_step000002" / "trainer_state.json").is_file()
