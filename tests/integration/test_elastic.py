"""Two simulated nodes under torchrun's elastic agent: the node holding rank 0 is lost, the other
goes on alone, the lost node is started again and taken back; the run ends as a fault-free run.

The rendezvous store is served outside the nodes (:func:`megatron_tinyllama.elastic.serve_store`),
as the README asks: the agent hosting it would otherwise take the job down with its node.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from megatron_tinyllama.elastic import serve_store
from megatron_tinyllama.launch import free_port, launcher_env

pytestmark = pytest.mark.slow

STEPS = 40
# Fast failure detection for a test on one machine: a lost agent is dropped after 5 missed 1 s
# heartbeats, and a round closes 2 s after its first member (the README's values are larger).
RDZV_CONF = "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=5"
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def _recipe(tmp_path: Path, corpus, name: str) -> Path:
    recipe = {
        "name": name,
        "model": {"preset": "tinyllama-debug", "vocab_size": 1024},
        "data": {"blend": f"1.0 {corpus.text_prefix}"},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_tokens": 2048},
        "train": {"train_tokens": STEPS * 1024, "global_batch_tokens": 1024, "micro_batch_size": 4,
                  "precision": "fp32"},
        "checkpoint": {"save_dir": str(tmp_path / name), "save_interval_steps": 3, "keep_last": 2},
        "logging": {"log_interval_steps": 1},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _records(save_dir: Path) -> list[dict]:
    path = save_dir / "metrics.jsonl"
    records = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            records.append(json.loads(line))
        except ValueError:  # being written
            pass
    return records


def _wait_for(what: str, condition, procs: list, timeout_s: float = 180.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if procs and all(p.poll() is not None for p in procs):
            raise AssertionError(f"every agent exited ({[p.returncode for p in procs]}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _agent(recipe: Path, endpoint: str, log: Path, env: dict) -> subprocess.Popen:
    cmd = ["torchrun", "--nnodes=1:2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint={endpoint}", "--rdzv-id=elastic-test", "--max-restarts=5",
           f"--rdzv-conf={RDZV_CONF}", "-m", "megatron_tinyllama.train.pretrain", "--config", str(recipe)]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_node(agent: subprocess.Popen) -> None:
    """A node lost: its agent and every process under it, at once."""
    root = psutil.Process(agent.pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            process.kill()
        except psutil.Error:
            pass
    agent.wait()


def _train_losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def test_a_lost_node_is_left_behind_and_taken_back_and_the_run_ends_as_a_fault_free_one(
        tmp_path, small_corpus):
    env = {**launcher_env(), "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    port = free_port()
    ready, stop = threading.Event(), threading.Event()
    threading.Thread(target=serve_store, args=(port, "127.0.0.1", ready, stop), daemon=True).start()
    assert ready.wait(30)
    endpoint = f"127.0.0.1:{port}"
    recipe = _recipe(tmp_path, small_corpus, "elastic")
    save_dir = tmp_path / "elastic"
    agents = [_agent(recipe, endpoint, tmp_path / f"node{i}.log", env) for i in range(2)]
    try:
        first = _wait_for("the first world", lambda: next(
            (r for r in _records(save_dir) if r.get("event") == "world"), None), agents)
        assert first["world_size"] == 2 and first["previous_world_size"] is None
        _wait_for("step 7", lambda: max(_train_losses(_records(save_dir)), default=0) >= 7, agents)

        # Lose the node of rank 0 (the metrics writer): the other node's rank becomes rank 0.
        rank0_agent = int(re.search(r"agent pid (\d+)", first["nodes"][0]).group(1))
        lost = next(a for a in agents if a.pid == rank0_agent)
        survivor = next(a for a in agents if a is not lost)
        _kill_node(lost)
        alone = _wait_for("the world of one", lambda: next(
            (r for r in _records(save_dir) if r.get("event") == "world" and r["world_size"] == 1), None),
            [survivor])
        # Hold the lone rank until its agent has seen the returning node (its SIGTERM pending),
        # so that a fast machine cannot finish the run at world 1 first.
        worker = psutil.Process(survivor.pid).children()[0]
        worker.suspend()
        back = _agent(recipe, endpoint, tmp_path / "node_back.log", env)
        agents.append(back)

        def sigterm_pending() -> bool:
            status = Path(f"/proc/{worker.pid}/status").read_text()
            return bool(int(re.search(r"ShdPnd:\s*([0-9a-f]+)", status).group(1), 16) & SIGTERM_BIT)

        _wait_for("the agent to restart its rank for the returning node", sigterm_pending, [survivor])
        worker.resume()  # it finishes its step, saves and exits 3 (SIGTERM), then both start at world 2
        for agent in (survivor, back):
            assert agent.wait(timeout=240) == 0, (tmp_path / "node_back.log").read_text()[-3000:]
    finally:
        for agent in agents:
            if agent.poll() is None:
                _kill_node(agent)
        stop.set()

    records = _records(save_dir)
    worlds = [r for r in records if r.get("event") == "world"]
    assert [w["world_size"] for w in worlds] == [2, 1, 2], worlds
    assert worlds[1]["lost"] == [first["nodes"][0]] and worlds[1]["joined"] == []
    assert worlds[1]["last_step"] >= 7 and worlds[1]["checkpoint_world_size"] == 2
    assert worlds[2]["lost"] == [] and worlds[2]["joined"] == [f"{alone['nodes'][0].split(' ')[0]} "
                                                                f"(agent pid {back.pid})"]
    losses = _train_losses(records)
    assert sorted(losses) == list(range(1, STEPS + 1))  # each step once: the redone ones superseded
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, STEPS + 1))
    # The recipe's global batch at every world: 4 x 2 accumulation at DP 2, 4 x 4 at DP 1.
    assert {r["global_batch_size"] for r in records if "train_loss" in r} == {16}

    # The same recipe without a fault, on one rank: the same global batches in the same order.
    reference = _recipe(tmp_path, small_corpus, "fault_free")
    subprocess.run(["torchrun", "--standalone", "--nproc-per-node=1", "-m",
                    "megatron_tinyllama.train.pretrain", "--config", str(reference)],
                   env=env, check=True, capture_output=True, timeout=240)
    expected = _train_losses(_records(tmp_path / "fault_free"))
    # Not bitwise: DP 2 and DP 1 sum a step's gradients in another order. Seen: 9.5e-7 at most
    # (2 ulp of a loss near 6); a batch read out of order or a moment lost is off by 1e-3 and more.
    worst = max(abs(losses[s] - expected[s]) for s in expected)
    assert worst <= 1e-5, {s: (losses[s], expected[s]) for s in expected}
