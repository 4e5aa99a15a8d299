"""End to end through the real ``deepspeed`` launcher and a hostfile, on CPU ranks over gloo.

DP=2 ZeRO-3 (loss falls on real text, validation, exact resume, HF export with logits parity),
TP=2, ZeRO++ node-local sharding on two simulated nodes of two ranks, and a scheduler's
SIGTERM to the launcher.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from megatron_tinyllama.checkpoint.convert import convert_to_hf
from megatron_tinyllama.checkpoint.hf import merge_tp_shards
from megatron_tinyllama.checkpoint.native import load_into_model
from megatron_tinyllama.checkpoint.per_rank import load_model_checkpoint
from megatron_tinyllama.launch import launch_local
from megatron_tinyllama.model.build import build_model, forward_logits, padded_vocab_size
from tests.hf_helpers import hf_logits

pytestmark = pytest.mark.slow


def _recipe(tmp_path: Path, corpus, name: str, steps: int, **sections) -> Path:
    recipe = {
        "name": name,
        "model": {"preset": "tinyllama-debug", "vocab_size": 1024},
        "data": {"blend": f"1.0 {corpus.text_prefix}", "valid_blend": f"1.0 {corpus.code_prefix}"},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_tokens": 2048},
        "train": {"train_tokens": steps * 1024, "global_batch_tokens": 1024, "micro_batch_size": 4,
                  "precision": "fp32"},
        "checkpoint": {"save_dir": str(tmp_path / name), "save_interval_steps": steps // 2, "keep_last": 3},
        "logging": {"log_interval_steps": 1, "eval_interval_steps": steps // 2, "eval_tokens": 1024,
                    "tensorboard_dir": str(tmp_path / name / "tb")},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _metrics(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


def _train_losses(records: list[dict]) -> dict[int, float]:
    """Step -> loss, the last record of each step winning (a resumed run appends)."""
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def _assert_hf_parity(save_dir: Path, tmp_path: Path, mcore_cpu_ready: None = None) -> None:
    """The converted checkpoint gives our model's logits (ours rebuilt at TP=1 from the export)."""
    hf_dir = convert_to_hf(save_dir, tmp_path / f"{save_dir.name}_hf")
    from megatron_tinyllama.checkpoint.convert import resolve_model_dir

    model_cfg, shards = load_model_checkpoint(resolve_model_dir(save_dir))
    full = merge_tp_shards(shards)
    model = build_model(model_cfg).eval()
    assert full["embedding.word_embeddings.weight"].shape[0] == padded_vocab_size(model_cfg.vocab_size, len(shards))
    if len(shards) > 1:  # re-pad for TP=1
        from megatron_tinyllama.checkpoint.hf import hf_to_mcore, mcore_to_hf

        full = hf_to_mcore(mcore_to_hf(full, model_cfg), model_cfg, padded_vocab_size(model_cfg.vocab_size, 1))
    load_into_model(model, full, source=str(save_dir))
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = forward_logits(model, tokens)[..., : model_cfg.vocab_size]
    assert (ours - hf_logits(hf_dir, tokens)).abs().max().item() <= 1e-4


def test_dp2_zero3_learns_validates_resumes_exactly_and_converts(tmp_path, small_corpus, mcore_cpu):
    steps = 12
    recipe = _recipe(tmp_path, small_corpus, "dp2", steps, parallel={"zero_stage": 3})
    save_dir = tmp_path / "dp2"
    launch_local(recipe, nodes=1, ranks_per_node=2, work_dir=tmp_path, timeout_s=600)
    first = _metrics(save_dir)
    losses = _train_losses(first)
    assert sorted(losses) == list(range(1, steps + 1))
    assert sum(losses[s] for s in (10, 11, 12)) / 3 < sum(losses[s] for s in (1, 2, 3)) / 3 - 0.5
    valid = [r["valid_loss"] for r in first if "valid_loss" in r]
    assert len(valid) == 2 and valid[1] < valid[0]
    assert any(p.name.startswith("events.out.tfevents") for p in (save_dir / "tb").iterdir())
    assert all(r["skipped_steps"] == 0 and r["global_batch_size"] == 16 for r in first if "train_loss" in r)

    # Resume from the middle checkpoint: the same losses, to the last bit.
    (save_dir / "latest").write_text("global_step000006")
    launch_local(recipe, nodes=1, ranks_per_node=2, work_dir=tmp_path, timeout_s=600)
    after = _metrics(save_dir)  # the first run's steps 7-12 are superseded by the resume
    resume = next(i for i, r in enumerate(after) if r.get("event") == "resume")
    assert after[:resume] == [r for r in first if r["step"] <= 6] and after[resume]["step"] == 6
    resumed = _train_losses(after[resume + 1:])
    assert sorted(resumed) == list(range(7, steps + 1))
    assert all(resumed[s] == losses[s] for s in resumed), (resumed, losses)

    _assert_hf_parity(save_dir, tmp_path)


def test_tp2_trains_and_converts_with_parity(tmp_path, small_corpus, mcore_cpu):
    recipe = _recipe(tmp_path, small_corpus, "tp2", 4, parallel={"tensor_parallel_size": 2},
                     data={"valid_blend": ""})
    launch_local(recipe, nodes=1, ranks_per_node=2, work_dir=tmp_path, timeout_s=600)
    save_dir = tmp_path / "tp2"
    losses = _train_losses(_metrics(save_dir))
    assert len(losses) == 4 and losses[4] < losses[1]
    _, shards = load_model_checkpoint(save_dir / "global_step000004")
    assert len(shards) == 2
    _assert_hf_parity(save_dir, tmp_path)


def test_node_local_sharding_takes_its_group_from_the_launcher_on_two_simulated_nodes(tmp_path, small_corpus):
    """What only the launcher can show: with ``hpz_partition_size: 0`` the node-local group is the
    launcher's local world size on each of two nodes (``--no_ssh``, one launcher per node). That
    such a run trains exactly as the reference trainer is shown on gloo ranks, at TP=2 on two
    simulated nodes of four (tests/distributed/test_reference_equivalence.py); a second launch of
    plain ZeRO-3 to compare with cost a minute and showed nothing more."""
    hpz = _recipe(tmp_path, small_corpus, "hpz", 4, parallel={"hpz_partition_size": 0, "zero_stage": 3},
                  data={"valid_blend": ""}, logging={"eval_interval_steps": 100})
    log = tmp_path / "hpz_launch"
    launch_local(hpz, nodes=2, ranks_per_node=2, work_dir=tmp_path / "hpz_launcher", timeout_s=600,
                 log_path=log)
    text = Path(str(log) + ".node0.log").read_text()
    assert "DP=4" in text and "hpZ 2" in text  # group = the launcher's local world size
    losses = _train_losses(_metrics(tmp_path / "hpz"))
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]


def test_sigterm_to_the_launcher_and_a_time_limit_stop_the_job_with_a_checkpoint(tmp_path, small_corpus):
    """A scheduler signals the ``deepspeed`` launcher's PID, not the ranks: the launcher dies at once
    (it passes nothing on when it runs the node itself), and the ranks must not outlive it."""
    import signal
    import subprocess
    import time

    import psutil

    from megatron_tinyllama.launch import deepspeed_command, free_port, launcher_env, write_local_hostfile

    recipe = _recipe(tmp_path, small_corpus, "limited", 400, data={"valid_blend": ""},
                     checkpoint={"save_interval_steps": 1000})
    save_dir = tmp_path / "limited"
    hostfile = write_local_hostfile(tmp_path / "hostfile", 1, 2)
    log_path = tmp_path / "launcher.log"
    with open(log_path, "w") as log:
        runner = subprocess.Popen(deepspeed_command(hostfile, 0, free_port(), recipe), env=launcher_env(),
                                  stdout=log, stderr=subprocess.STDOUT)
    below: list = []
    try:
        deadline = time.monotonic() + 400
        while "step 1 |" not in log_path.read_text():
            assert runner.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        below = psutil.Process(runner.pid).children(recursive=True)  # deepspeed's launch + 2 ranks
        launch = [p for p in below if "deepspeed.launcher.launch" in p.cmdline()]
        assert len(launch) == 1 and len(launch[0].children()) == 2
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=30) == -signal.SIGTERM  # deepspeed's runner: no handler, gone at once
        _, alive = psutil.wait_procs(below, timeout=300)
        assert not alive, f"orphans: {[(p.pid, p.cmdline()[:4]) for p in alive]}"
    finally:  # whatever failed above, leave no process behind
        for proc in below:
            if proc.is_running():
                proc.kill()
        if runner.poll() is None:
            runner.kill()
    text = log_path.read_text()
    assert "the deepspeed launcher (pid " in text and "exited: stopping after this step" in text
    stopped = int((save_dir / "latest").read_text().removeprefix("global_step"))
    assert (save_dir / f"global_step{stopped:06d}" / "trainer_state.json").is_file()
    assert f"stopped at step {stopped} " in text and sorted(_train_losses(_metrics(save_dir)))[-1] == stopped

    # The same command resumes; a time limit stops it again after one step, with exit status 3.
    recipe = _recipe(tmp_path, small_corpus, "limited", 400, data={"valid_blend": ""},
                     checkpoint={"save_interval_steps": 1000}, train={"stop_after_minutes": 1e-9})
    with pytest.raises(subprocess.CalledProcessError) as err:
        launch_local(recipe, nodes=1, ranks_per_node=2, work_dir=tmp_path / "again", timeout_s=600)
    assert err.value.returncode == 3
    assert (save_dir / "latest").read_text() == f"global_step{stopped + 1:06d}"
    assert sorted(_train_losses(_metrics(save_dir)))[-1] == stopped + 1
