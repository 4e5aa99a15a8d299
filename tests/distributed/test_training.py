"""The training loop on gloo ranks with DeepSpeed ZeRO-3: NaN handling and crash-safe checkpoints."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from tests.distributed.ranks import run_on_ranks

pytestmark = pytest.mark.distributed


def _config(save_dir=None, **train):
    from megatron_tinyllama.config import config_from_dict

    train_section = {"train_tokens": 64 * 8 * 4, "global_batch_tokens": 64 * 8, "micro_batch_size": 2,
                     "precision": "fp32", **train}
    tree = {"model": {"preset": "tinyllama-debug"}, "parallel": {"zero_stage": 3}, "train": train_section,
            "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_tokens": 512},
            "logging": {"log_interval_steps": 1}}
    if save_dir:
        tree["checkpoint"] = {"save_dir": str(save_dir), "save_interval_steps": 2, "keep_last": 3}
    return config_from_dict(tree)


def _poison_steps(rank_to_poison: int, steps: set[int], micro_batches_per_step: int):
    """Make compute_loss return NaN on one rank during the given (1-based) steps."""
    import torch.distributed as dist

    from megatron_tinyllama.train import loop

    original = loop.compute_loss
    calls = {"n": 0}

    def poisoned(te, cfg, batch):
        loss, metrics = original(te, cfg, batch)
        step = calls["n"] // micro_batches_per_step + 1
        calls["n"] += 1
        if dist.get_rank() == rank_to_poison and step in steps:
            loss = loss * float("nan")
        return loss, metrics

    loop.compute_loss = poisoned


def _nan_worker(rank, world_size, out, poison, max_bad):
    from megatron_tinyllama.train.loop import NonFiniteLossError, train
    from tests.distributed.synthetic import synthetic_batches

    os.environ["DS_ACCELERATOR"] = "cpu"
    cfg = _config(max_consecutive_nonfinite=max_bad)
    _poison_steps(1, poison, micro_batches_per_step=2)  # 8 sequences / (2 ranks x 2) = 2 micro-batches
    try:
        result = train(cfg, batch_source=synthetic_batches)
        outcome = {"losses": result.losses, "skipped": result.state.skipped_steps,
                   "applied": result.applied_updates, "error": None}
    except NonFiniteLossError as err:
        outcome = {"error": str(err)}
    (out / f"rank{rank}.json").write_text(json.dumps(outcome))


def test_nan_loss_on_one_rank_skips_the_step_everywhere(tmp_path):
    run_on_ranks(_nan_worker, 2, tmp_path, {2}, 3)
    for rank in range(2):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outcome["error"] is None
        assert outcome["skipped"] == 1
        assert outcome["applied"] == 3  # 4 steps, one discarded by every rank
        losses = outcome["losses"]
        assert len(losses) == 4 and losses[1] != losses[1]  # NaN recorded for step 2
        assert all(x == x for i, x in enumerate(losses) if i != 1)


def test_consecutive_nan_steps_halt_with_a_clear_message(tmp_path):
    run_on_ranks(_nan_worker, 2, tmp_path, {2, 3}, 2)
    for rank in range(2):
        error = json.loads((tmp_path / f"rank{rank}.json").read_text())["error"]
        assert error is not None and "halted at step 3" in error and "2 consecutive steps" in error


def _kill_during_second_save_worker(rank, world_size, save_dir):
    from megatron_tinyllama.checkpoint import sharded
    from megatron_tinyllama.train.loop import train
    from tests.distributed.synthetic import synthetic_batches

    os.environ["DS_ACCELERATOR"] = "cpu"

    original = sharded._DigestingFile.write

    def write_then_die(self, data):
        if "global_step000004" in str(self.name) and self.bytes > 0:
            # In the middle of the rank's file of step 4, on the background save's thread.
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, data)

    sharded._DigestingFile.write = write_then_die
    train(_config(save_dir), batch_source=synthetic_batches)


def _resume_worker(rank, world_size, save_dir, out):
    from megatron_tinyllama.train.loop import train
    from tests.distributed.synthetic import synthetic_batches

    os.environ["DS_ACCELERATOR"] = "cpu"
    result = train(_config(save_dir), batch_source=synthetic_batches)
    (out / "resume.json").write_text(json.dumps({"losses": result.losses, "step": result.state.step}))


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    import torch.multiprocessing as mp

    from megatron_tinyllama.checkpoint.convert import convert_to_hf

    save_dir = tmp_path / "run"
    with pytest.raises(mp.ProcessExitedException):
        run_on_ranks(_kill_during_second_save_worker, 1, save_dir)
    assert (save_dir / "latest").read_text().strip() == "global_step000002"
    assert (save_dir / "global_step000004").is_dir()  # the interrupted save
    assert not (save_dir / "global_step000004" / "trainer_state.json").exists()
    killed = {r["step"]: r["train_loss"] for r in map(json.loads, (save_dir / "metrics.jsonl").read_text().splitlines())
              if "train_loss" in r}
    assert sorted(killed) == [1, 2, 3, 4]  # the killed run trained step 4, then died in its save
    # The converter and a restart both use step 2; the restart then finishes the run.
    convert_to_hf(save_dir, tmp_path / "hf")
    run_on_ranks(_resume_worker, 1, save_dir, tmp_path)
    resumed = json.loads((tmp_path / "resume.json").read_text())
    assert resumed["step"] == 4 and len(resumed["losses"]) == 2
    assert resumed["losses"] == [killed[3], killed[4]]  # exact: from step 2, as if never killed
    assert (save_dir / "latest").read_text().strip() == "global_step000004"
    assert (save_dir / "global_step000004" / "trainer_state.json").is_file()


def _stage_worker(rank, world_size, save_dir, out):
    from megatron_tinyllama.train.loop import train
    from tests.distributed.synthetic import synthetic_batches

    os.environ["DS_ACCELERATOR"] = "cpu"
    seen = []

    def recording_batches(data_cfg, **kwargs):
        seen.append(kwargs["consumed_samples"])
        return synthetic_batches(data_cfg, **kwargs)

    cfg = _config(save_dir, start_tokens=2048, train_tokens=2048 + 3 * 512)
    result = train(cfg, batch_source=recording_batches)
    (out / "stage.json").write_text(json.dumps({"first_sample": seen[0], "steps": result.state.step,
                                                "tokens": result.state.consumed_tokens}))


def test_a_new_stage_continues_the_lr_curve_but_starts_its_own_data_order(tmp_path):
    from megatron_tinyllama.train.schedule import learning_rate

    save_dir = tmp_path / "stage2"
    run_on_ranks(_stage_worker, 1, save_dir, tmp_path)
    outcome = json.loads((tmp_path / "stage.json").read_text())
    assert outcome == {"first_sample": 0, "steps": 3, "tokens": 2048 + 3 * 512}
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    cfg = _config(save_dir, start_tokens=2048, train_tokens=2048 + 3 * 512)
    assert records[0]["lr"] == pytest.approx(learning_rate(2048 + 512, cfg.optimizer, cfg.train.train_tokens))
