"""Checkpoint faults on real runs: each one reproduced, then the outcome, the message naming the
place, and the bytes of every earlier good checkpoint checked unchanged."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest

from tests.distributed.ranks import run_on_ranks

pytestmark = pytest.mark.distributed

SEQ, GLOBAL_BATCH = 64, 8
STEP_TOKENS = SEQ * GLOBAL_BATCH


def recipe(save_dir: Path, steps: int, **model) -> dict:
    return {"model": {"preset": "tinyllama-debug", **model},
            "train": {"train_tokens": steps * STEP_TOKENS, "global_batch_tokens": STEP_TOKENS,
                      "micro_batch_size": 2, "precision": "fp32"},
            "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_tokens": STEP_TOKENS, "decay_tokens": 20 * STEP_TOKENS},
            "checkpoint": {"save_dir": str(save_dir), "save_interval_steps": 2, "keep_last": 0},
            "logging": {"log_interval_steps": 1}}


def _log_to(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)


def _train_worker(rank, world_size, tree, log_path):
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.train.loop import train
    from tests.distributed.synthetic import synthetic_batches

    _log_to(Path(f"{log_path}.rank{rank}"))
    train(config_from_dict(tree), batch_source=synthetic_batches)


def run(save_dir: Path, steps: int, log: Path, world_size: int = 1) -> str:
    run_on_ranks(_train_worker, world_size, recipe(save_dir, steps), str(log))
    return Path(f"{log}.rank0").read_text()


def losses(save_dir: Path) -> list[tuple[int, float]]:
    lines = (save_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["train_loss"]) for r in map(json.loads, lines) if "train_loss" in r]


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_damaged_or_missing_checkpoints_fall_back_and_nothing_good_is_lost(tmp_path):
    save_dir = tmp_path / "run"
    run(save_dir, 6, tmp_path / "a.log")
    first = dict(losses(save_dir))
    assert sorted(p.name for p in save_dir.glob("global_step*")) == [
        "global_step000002", "global_step000004", "global_step000006"]
    good = {tag: digest(save_dir / tag) for tag in ("global_step000002", "global_step000004")}

    # 1. A truncated rank file in the newest checkpoint: named, set aside, step 4 used.
    shard = save_dir / "global_step000006" / "state" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    damaged = digest(save_dir / "global_step000006")
    log = run(save_dir, 8, tmp_path / "b.log")
    assert f"{shard}: " in log and "truncated" in log and "fell back to" in log
    assert digest(save_dir / "global_step000006.corrupt") == damaged  # kept, byte for byte
    resumed = losses(save_dir)
    assert [s for s, _ in resumed] == list(range(1, 9))  # each step once, 5-6 trained again
    assert all(loss == first[s] for s, loss in resumed if s in first)  # exact from step 4
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    (event,) = [r for r in records if "event" in r]
    assert event["event"] == "resume" and event["step"] == 4 and records.index(event) == 4
    aside = [json.loads(line) for line in (save_dir / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train_loss"]) for r in aside[1:]] == [(5, first[5]), (6, first[6])]
    assert {tag: digest(save_dir / tag) for tag in good} == good

    # 2. 'latest' names a directory that is gone: the newest complete one (6) is used, said so.
    shutil.rmtree(save_dir / "global_step000008")
    log = run(save_dir, 10, tmp_path / "c.log")
    assert "names global_step000008, which is missing" in log
    assert [s for s, _ in losses(save_dir)[-4:]] == [7, 8, 9, 10]
    assert {tag: digest(save_dir / tag) for tag in good} == good

    # 3. The converter meets a corrupt checkpoint: it names the file and uses the previous one.
    from megatron_tinyllama.checkpoint.convert import resolve_model_dir

    model_file = save_dir / "global_step000010" / "state" / "__0_0.distcp"
    model_file.write_bytes(b"\0" * model_file.stat().st_size)
    assert resolve_model_dir(save_dir) == save_dir / "global_step000008"


def _drift_worker(rank, world_size, tree, log_path, out):
    """Perturb TP rank 1's copy of a norm gain just before the first checkpoint is written."""
    import torch
    from megatron.core import parallel_state

    from megatron_tinyllama.checkpoint import saving
    from megatron_tinyllama.checkpoint.weights import ReplicaDriftError
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.train.loop import train
    from tests.distributed.synthetic import synthetic_batches

    _log_to(Path(f"{log_path}.rank{rank}"))
    original = saving._replicated_fp32

    def drifted(engine):
        state = original(engine)
        if parallel_state.get_tensor_model_parallel_rank() == 1:
            state["decoder.final_layernorm.weight"] = state["decoder.final_layernorm.weight"] + torch.full_like(
                state["decoder.final_layernorm.weight"], 1e-3)
        return state

    saving._replicated_fp32 = drifted
    try:
        train(config_from_dict(tree), batch_source=synthetic_batches)
        error = None
    except ReplicaDriftError as err:
        error = str(err)
    (Path(out) / f"drift{rank}.json").write_text(json.dumps({"error": error}))


def test_tp_replicas_that_drift_stop_the_run_before_the_checkpoint_counts(tmp_path):
    tree = recipe(tmp_path / "run", 4)
    tree["parallel"] = {"tensor_parallel_size": 2}
    run_on_ranks(_drift_worker, 2, tree, str(tmp_path / "d.log"), str(tmp_path))
    for rank in range(2):
        error = json.loads((tmp_path / f"drift{rank}.json").read_text())["error"]
        assert error is not None and "differs from TP rank 0's copy by 1.000e-03" in error
    assert "decoder.final_layernorm.weight" in json.loads((tmp_path / "drift1.json").read_text())["error"]
    assert not (tmp_path / "run" / "latest").exists()
    assert not (tmp_path / "run" / "global_step000002" / "trainer_state.json").exists()


def _entry_worker(rank, world_size, recipe_path, out):
    from megatron_tinyllama.train.pretrain import main

    (Path(out) / "exit.json").write_text(json.dumps({"code": main(["--config", str(recipe_path)])}))


def test_resuming_with_another_head_layout_exits_2_naming_the_fields(tmp_path, capfd):
    import yaml

    save_dir = tmp_path / "run"
    run(save_dir, 2, tmp_path / "a.log")
    before = digest(save_dir)
    # 16 heads in 4 groups of dim 4: every tensor has the shape of 8 heads in 2 groups of dim 8.
    other = recipe(save_dir, 4, num_attention_heads=16, num_query_groups=4)
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other))
    run_on_ranks(_entry_worker, 1, path, str(tmp_path))
    assert json.loads((tmp_path / "exit.json").read_text())["code"] == 2
    err = capfd.readouterr().err
    assert "model.num_attention_heads: checkpoint 8, recipe 16" in err
    assert "model.num_query_groups: checkpoint 2, recipe 4" in err
    assert digest(save_dir) == before


def _stop_worker(rank, world_size, tree, out):
    """Rank 1 receives SIGUSR1 during step 2, as a scheduler's pre-emption notice would arrive."""
    import os
    import signal

    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.train import loop
    from tests.distributed.synthetic import synthetic_batches

    original, calls = loop.compute_loss, {"n": 0}

    def signalled(te, cfg, batch):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 3:  # 2 micro-batches per step: the first of step 2
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(te, cfg, batch)

    loop.compute_loss = signalled
    result = loop.train(config_from_dict(tree), batch_source=synthetic_batches)
    (Path(out) / f"stop{rank}.json").write_text(json.dumps({"stopped": result.stopped, "step": result.state.step,
                                                           "resume_step": result.resume_step}))


def test_a_signal_to_one_rank_stops_every_rank_after_the_step_with_a_checkpoint(tmp_path):
    save_dir = tmp_path / "run"
    tree = recipe(save_dir, 6)
    tree["checkpoint"]["save_interval_steps"] = 100
    run_on_ranks(_stop_worker, 2, tree, str(tmp_path))
    outcomes = [json.loads((tmp_path / f"stop{r}.json").read_text()) for r in range(2)]
    # Step 1 saved at the signal (beside step 2), or step 2 when the relay reached rank 0 only
    # after its update: the same on both ranks either way.
    kept = outcomes[1]["resume_step"] or 2
    assert outcomes[1] == {"stopped": "signal SIGUSR1", "step": 2, "resume_step": outcomes[1]["resume_step"]}
    # The rank that was not signalled names who asked and why (before: "a stop request on
    # another rank", which told an operator nothing when a node's launcher had died).
    assert outcomes[0] == {"stopped": "a stop request from rank 1 (node 0): a signal", "step": 2,
                           "resume_step": outcomes[1]["resume_step"]}
    assert (save_dir / "latest").read_text() == f"global_step{kept:06d}"
    assert (save_dir / f"global_step{kept:06d}" / "trainer_state.json").is_file()
    # The same recipe resumes and finishes; a time limit stops it again after one step.
    tree["train"]["stop_after_minutes"] = 1e-9
    run_on_ranks(_train_worker, 2, tree, str(tmp_path / "b.log"))
    assert [s for s, _ in losses(save_dir)] == list(range(1, kept + 2))
    assert "train.stop_after_minutes reached" in Path(f"{tmp_path / 'b.log'}.rank0").read_text()


def _preempted_worker(rank, world_size, tree, out, signalled):
    """Ranks ``signalled`` receive SIGTERM in the first micro-batch of step 3, as a pre-emption
    reaches them (SLURM: every task; DeepSpeed's per-node launcher: one rank, the next only once
    that one is dead); the step then goes on slowly (a long step: the CPU pre-emption case). At
    the step's last micro-batch each rank notes whether step 2's checkpoint is complete."""
    import os
    import signal
    import time

    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.train import loop
    from tests.distributed.synthetic import synthetic_batches

    original, calls, seen = loop.compute_loss, {"n": 0}, {}
    done_file = Path(tree["checkpoint"]["save_dir"]) / "global_step000002" / "trainer_state.json"
    accumulation = 4  # micro-batches per step (micro_batch_size 1, 8 samples, 2 ranks)

    def signalled_loss(te, cfg, batch):
        calls["n"] += 1
        if calls["n"] == 2 * accumulation + 1 and rank in signalled:
            os.kill(os.getpid(), signal.SIGTERM)
        if calls["n"] > 2 * accumulation:
            time.sleep(1.0)  # step 3 is long: 4 s
        if calls["n"] == 3 * accumulation:
            seen["step 2 complete during step 3"] = done_file.is_file()
        return original(te, cfg, batch)

    loop.compute_loss = signalled_loss
    result = loop.train(config_from_dict(tree), batch_source=synthetic_batches)
    (Path(out) / f"pre{rank}.json").write_text(json.dumps({
        "stopped": result.stopped, "step": result.state.step, "resume_step": result.resume_step, **seen}))


@pytest.mark.parametrize("signalled", [(0, 1), (0,)], ids=["every-rank", "one-rank"])
def test_a_preemption_saves_the_last_step_beside_the_step_in_flight_and_resumes_exactly(tmp_path, signalled):
    """Issue 27 item 6: a pre-empted job must hold a complete checkpoint within the launcher's
    30 s, however long its step: the last completed step is written at the signal, beside the
    step in flight (which the resume redoes), on every rank: a rank not signalled hears of it
    through the rendezvous store (train.stop_relay), not at the end of the step."""
    save_dir = tmp_path / "run"
    tree = recipe(save_dir, 6)
    tree["train"]["micro_batch_size"] = 1
    tree["checkpoint"]["save_interval_steps"] = 100  # no save but the signal's
    run_on_ranks(_preempted_worker, 2, tree, str(tmp_path), signalled)
    outcomes = [json.loads((tmp_path / f"pre{r}.json").read_text()) for r in range(2)]
    for rank, outcome in enumerate(outcomes):
        assert outcome["step 2 complete during step 3"] is True, outcome
        assert outcome["step"] == 3 and outcome["resume_step"] == 2, outcome
        assert outcome["stopped"] == ("signal SIGTERM" if rank in signalled
                                      else "a stop request from rank 0 (node 0): a signal"), outcome
    assert (save_dir / "latest").read_text() == "global_step000002"
    assert not (save_dir / "global_step000003").exists()
    before = losses(save_dir)
    assert [s for s, _ in before] == [1, 2, 3]
    run_on_ranks(_train_worker, 2, tree, str(tmp_path / "b.log"))
    after = losses(save_dir)  # the resume rolls metrics.jsonl back to its checkpoint's step
    assert [s for s, _ in after] == [1, 2, 3, 4, 5, 6]
    assert after[:3] == before  # step 3 redone from step 2's checkpoint: the same loss, exactly


def _ranked_entry_worker(rank, world_size, recipe_path, out):
    from megatron_tinyllama.train.pretrain import main

    (Path(out) / f"exit{rank}.json").write_text(json.dumps({"code": main(["--config", str(recipe_path)])}))


def test_a_second_job_on_a_save_dir_in_use_is_refused_on_every_rank(tmp_path, capfd):
    import os

    import yaml

    from megatron_tinyllama.checkpoint.lock import acquire_save_dir_lock

    save_dir = tmp_path / "run"
    save_dir.mkdir()
    (save_dir / "metrics.jsonl").write_text('{"step": 1, "train_loss": 9.0}\n')  # the first job's
    first_job = acquire_save_dir_lock(save_dir)  # this process plays the job still running there
    before = digest(save_dir)
    try:
        path = tmp_path / "again.yaml"
        path.write_text(yaml.safe_dump(recipe(save_dir, 4)))
        run_on_ranks(_ranked_entry_worker, 2, path, str(tmp_path))
        after = digest(save_dir)
    finally:
        first_job.release()
    assert [json.loads((tmp_path / f"exit{r}.json").read_text())["code"] for r in range(2)] == [2, 2]
    err = capfd.readouterr().err
    assert f"checkpoint.save_dir={save_dir} is in use by another job" in err
    assert f"pid {os.getpid()}, started" in err
    assert after == before  # nothing written: no metrics, no checkpoint, no config, same holder


def _disk_full_worker(rank, world_size, tree, out):
    """The disk fills up while step 4's checkpoint is written: every write into a file under it
    fails with ENOSPC after a few bytes, as on a full filesystem (checked on a 1 MB tmpfs)."""
    import errno
    import os

    from megatron_tinyllama.checkpoint import native
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.train.loop import train
    from tests.distributed.synthetic import synthetic_batches

    real_write = native._WholeWrites.write

    def full_disk_write(self, data):
        if "global_step000004" not in str(self.name):
            return real_write(self, data)
        real_write(self, memoryview(data)[:4])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    native._WholeWrites.write = full_disk_write
    try:
        train(config_from_dict(tree), batch_source=synthetic_batches)
        error = None
    except Exception as err:  # noqa: BLE001 (whatever reaches the entry point is the message)
        error = f"{type(err).__name__}: {err}"
    (Path(out) / f"full{rank}.json").write_text(json.dumps({"error": error}))


def test_a_full_disk_during_a_save_names_enospc_and_the_file_and_the_run_resumes(tmp_path):
    save_dir = tmp_path / "run"
    tree = recipe(save_dir, 4)
    run_on_ranks(_disk_full_worker, 1, tree, str(tmp_path))
    error = json.loads((tmp_path / "full0.json").read_text())["error"]
    assert error is not None and error.startswith("CheckpointWriteError: ")
    assert "ENOSPC: No space left on device" in error and "bytes free there" in error
    assert f"{save_dir / 'global_step000004'}{'/'}" in error  # the file that failed, by its path
    assert (save_dir / "latest").read_text() == "global_step000002"
    good = digest(save_dir / "global_step000002")
    first = dict(losses(save_dir))
    # Space freed: the same recipe resumes from step 2 and saves step 4 over the incomplete one.
    run(save_dir, 4, tmp_path / "b.log")
    assert digest(save_dir / "global_step000002") == good
    assert (save_dir / "latest").read_text() == "global_step000004"
    # Steps 3-4 of the failed run were superseded at the resume (metrics.superseded.jsonl); the
    # resumed run logs them again, to the same losses.
    assert [s for s, _ in losses(save_dir)] == [1, 2, 3, 4]
    assert all(loss == first[s] for s, loss in losses(save_dir))


def _outputs_worker(rank, world_size, recipe_path, out):
    import functools

    from megatron_tinyllama.train import loop
    from megatron_tinyllama.train.pretrain import main
    from tests.distributed.synthetic import synthetic_batches

    loop.train = functools.partial(loop.train, batch_source=synthetic_batches)
    code = main(["--config", str(recipe_path)])
    (Path(out) / f"exit{rank}.json").write_text(json.dumps({"code": code}))


def test_a_tensorboard_folder_that_cannot_be_created_exits_2_on_every_rank_before_the_engine(tmp_path, capfd):
    import yaml

    (tmp_path / "a_file").write_text("")
    tree = recipe(tmp_path / "run", 2)
    tree["logging"]["tensorboard_dir"] = str(tmp_path / "a_file" / "tb")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    run_on_ranks(_outputs_worker, 2, path, str(tmp_path))
    assert [json.loads((tmp_path / f"exit{r}.json").read_text())["code"] for r in range(2)] == [2, 2]
    err = capfd.readouterr().err
    expected = (f"rank 0: logging.tensorboard_dir: cannot create or write {tmp_path / 'a_file' / 'tb'}: "
                f"Not a directory ({tmp_path / 'a_file'} is a file)")
    assert err.count(expected) == 2 and "Connection closed" not in err
    assert not list((tmp_path / "run").glob("global_step*"))  # stopped before any step
