"""tinyllama-demo as a user runs it (a shortened recipe): live progress from rank 0, known noise
hidden but kept in the log file, the validation loss, outputs and next commands printed; and the
progress display on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tinyllama.demo import TrainingDisplay

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_training_display_shows_progress_and_our_lines_and_hides_noise(capsys):
    display = TrainingDisplay(total_steps=16)
    for line in [
        "[2026-11-26 12:24:59,714] [INFO] [launch.py:170:main] dist_world_size=2",
        "/x/optimizer.py:28: UserWarning: Transformer Engine and Apex are not installed. Falling back",
        "  warnings.warn(",
        "[rank0] 12:29:56 INFO megatron_tinyllama.engine.engine: engine: ZeRO-3, TP=1, DP=2",
        "[rank0] 12:30:24 INFO megatron_tinyllama.train.metrics: step 8 | loss 5.9647 | lr 1.9e-03 "
        "| grad_norm 0.694 | tokens 32,768 | batch 16 | 4,595 tok/s | 0.1 TFLOP/s/dev | skipped 0",
        "[rank0] 12:30:48 INFO megatron_tinyllama.train.metrics: step 8 | validation loss 5.4145",
        "[rank1] 12:30:49 WARNING megatron_tinyllama.train.loop: step 9: non-finite loss",
    ]:
        display(line + "\n")
    assert display.bar.n == 8 and "loss 5.965, 4,595 tok/s" in str(display.bar)
    display.close()
    shown = capsys.readouterr().out.splitlines()
    assert shown == ["  [rank0] engine: ZeRO-3, TP=1, DP=2", "  [rank0] step 8 | validation loss 5.4145",
                     "  [rank1] WARNING step 9: non-finite loss"]
    assert display.valid_losses == [(8, 5.4145)]


@pytest.mark.slow
def test_demo_end_to_end_prints_progress_loss_outputs_and_next_commands(tmp_path):
    work = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("TINYLLAMA_VERBOSE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_tinyllama.demo", "--work-dir", str(work),
         "--prompt", "def ", "train.train_tokens=32768", "logging.eval_interval_steps=8",
         "logging.log_interval_steps=2", "checkpoint.save_interval_steps=8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    metrics = (work / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in metrics]
    valid = [r["valid_loss"] for r in records if "valid_loss" in r]
    assert len(valid) == 2
    assert f"validation loss {valid[-1]:.3f} on held-out documents" in out
    assert "train: 100%" in out and "16/16" in out and "tok/s" in out  # the live bar's last state
    assert "step 8 | validation loss" in out  # rank 0's validation line as it came
    # Known noise is in the full log, not on the console.
    log = (work / "train.node0.log").read_text()
    assert "[INFO] [launch.py" in log and "[INFO] [launch.py" not in out
    assert "Transformer Engine and Apex" not in out
    assert "tensorboard --logdir demo/run/tb" in out and "tinyllama-generate demo/run" in out
    assert "tinyllama-convert-to-hf --input demo/run" in out and "train.train_tokens=65536" in out
    assert (work / "hf" / "model.safetensors").is_file()


def test_bf16_is_chosen_only_where_torch_may_use_the_bf16_units(monkeypatch):
    """An AVX512-BF16 CPU with torch capped at AVX2 (ATEN_CPU_CAPABILITY=avx2, how an AVX2-only
    machine is reproduced) emulates bf16: the demo must train in fp32 there."""
    import torch

    from megatron_tinyllama.demo import cpu_has_fast_bf16

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert cpu_has_fast_bf16()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not cpu_has_fast_bf16()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert not cpu_has_fast_bf16()
