"""benchmarks/bench_throughput.py stays runnable: a tiny shape on CPU, end to end."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from megatron_tinyllama.launch import free_port
from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_gpu_session_dry_run_runs_its_phases_in_order_and_records_each(tmp_path):
    """benchmarks/gpu_session.sh --dry-run: the session's plumbing at a tiny shape on CPU (no
    install): the head-to-head first, then the gpu-marked tests, then the other levers appended
    to the same results.json, each phase recorded in session.json with its status and the device
    name, the summary made from results.json. The plans hold each kind of configuration the
    benchmark has (HF, the stack plain, auto and with a lever requested), so this one run also
    keeps bench_throughput.py working end to end; hf-compile is left to the GPU (compiling it on
    CPU cost half a minute of the suite's ten)."""
    out = tmp_path / "out"
    head, rest = "hf-eager@2,stack-auto@2", "stack-plain@2"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "2", "MASTER_PORT": str(free_port()),
           "OUT": str(out), "HEAD_PLAN": head, "REST_PLAN": rest}
    proc = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_session.sh"), "--dry-run"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    session = json.loads((out / "session.json").read_text())
    assert session["device"] == "cpu" and session["dry_run"] and session["budget_s"] <= 480
    assert [p["phase"] for p in session["phases"]] == [
        "install", f"bench: {head}", "gpu tests", "demo", f"bench: {rest}", "summary"]
    assert [p.get("note") for p in session["phases"]][3] == "skipped"  # the demo: not in a dry run
    assert all(p["status"] == "ok" for p in session["phases"]), session
    results = json.loads((out / "bench" / "results.json").read_text())
    assert results["device"] == "cpu"
    assert [(r["config"], r["status"]) for r in results["results"]] == [
        (p.split("@")[0], "ok") for p in f"{head},{rest}".split(",")]
    for r in results["results"]:
        assert r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 and 0 < r["mfu"] < 1
    stack = [r for r in results["results"] if r["config"].startswith("stack-")]
    assert {r["zero_stage"] for r in stack} == {1, 3}  # auto is ZeRO-1 on one rank, plain is ZeRO-3
    # The stack's configurations start from the same weights and batches: same first loss, up to
    # bf16 rounding (their kernels differ).
    first = [r["first_loss"] for r in stack]
    assert max(first) - min(first) < 0.02, first
    log = (out / "bench.log").read_text()
    assert "MFU = tokens/s x" in log and "flops_per_token" in log and "peak GB:" in log
    assert "cross-entropy backend: plain (requested)" in log  # the log names each backend
    summary = (out / "bench" / "summary.txt").read_text()
    assert "stack-plain" in summary and "hf-eager" in summary
    assert (out / "gpu_tests.xml").is_file() and "skipped" in (out / "gpu_tests.log").read_text()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8  # what the device tool brings back
