"""benchmarks/bench_throughput.py stays runnable: a tiny shape on CPU, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_tinyllama.launch import free_port
from tests.conftest import REPO_ROOT


def test_bench_throughput_runs_every_kind_of_configuration_on_cpu(tmp_path):
    plan = "hf-eager@2,hf-compile@2,stack-plain@2,stack-auto@2,stack-auto-ce-chunked@2"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "2", "MASTER_PORT": str(free_port())}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_throughput.py"), "--preset", "tinyllama-debug",
         "--seq-length", "32", "--plan", plan, "--accumulation", "2", "--warmup-steps", "1", "--steps", "1",
         "--peak-tflops", "1", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "MFU = tokens/s x" in out and "flops_per_token" in out and "peak GB:" in out
    assert "goal: best stack" in out and "/HF+c" in out
    assert "cross-entropy backend: chunked (requested)" in out  # the log names each backend
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["config"] for r in results] == [p.split("@")[0] for p in plan.split(",")]
    for r in results:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 and 0 < r["mfu"] < 1
    stack = [r for r in results if r["config"].startswith("stack-")]
    assert {r["zero_stage"] for r in stack} == {1, 3}  # auto is ZeRO-1 on one rank, plain is ZeRO-3
    # The stack's configurations start from the same weights and batches: same first loss, up to
    # bf16 rounding (their kernels differ).
    first = [r["first_loss"] for r in stack]
    assert max(first) - min(first) < 0.02, first


@pytest.mark.slow
def test_gpu_session_dry_run_runs_its_phases_in_order_and_records_each(tmp_path):
    """benchmarks/gpu_session.sh --dry-run: the session's plumbing at a tiny shape on CPU (no
    install, nothing compiled): the head-to-head first, then the gpu-marked tests, then the other
    levers appended to the same results.json, each phase recorded in session.json with its
    status and the device name, the summary made from results.json."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "2", "MASTER_PORT": str(free_port()),
           "OUT": str(out)}
    proc = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_session.sh"), "--dry-run"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    session = json.loads((out / "session.json").read_text())
    assert session["device"] == "cpu" and session["dry_run"] and session["budget_s"] <= 480
    assert [p["phase"] for p in session["phases"]] == [
        "install", "bench: hf-eager@2,stack-auto@2", "gpu tests", "bench: stack-plain@2", "summary"]
    assert all(p["status"] == "ok" for p in session["phases"]), session
    results = json.loads((out / "bench" / "results.json").read_text())
    assert results["device"] == "cpu"
    assert [(r["config"], r["status"]) for r in results["results"]] == [
        ("hf-eager", "ok"), ("stack-auto", "ok"), ("stack-plain", "ok")]
    summary = (out / "bench" / "summary.txt").read_text()
    assert "stack-plain" in summary and "hf-eager" in summary
    assert (out / "gpu_tests.xml").is_file() and "skipped" in (out / "gpu_tests.log").read_text()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8  # what the device tool brings back
