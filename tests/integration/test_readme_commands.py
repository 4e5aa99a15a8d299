"""The launcher commands a user copies from README.md are the commands these tests run.

Every ``deepspeed`` command of the README's Training section is read from the README's text and
parsed by deepspeed's own runner and by our entry point; the CPU command is then run literally
(through bash, in a folder where the test has put the files the command names: a tiny recipe and
a hostfile where ``tinyllama-demo`` puts the demo's), and run again without its hostfile.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from megatron_tinyllama.launch import free_port, launcher_env, write_local_hostfile
from tests.conftest import REPO_ROOT

# Values for the shell variables the README's cluster commands leave to the user.
PLACEHOLDERS = {"NODE_RANK": "0", "MASTER_PORT": "29500"}


def readme_deepspeed_commands() -> list[str]:
    """Each ``deepspeed`` command of the README's Training section, continuation lines joined."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("### Training", 1)[1].split("\n### ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if "deepspeed " in command and not command.lstrip().startswith("#"):
                commands.append(" ".join(command.split()))
    return commands


def _argv(command: str) -> tuple[dict[str, str], list[str]]:
    """(leading VAR=value assignments, arguments after ``deepspeed``) with placeholders filled."""
    words = shlex.split(re.sub(r"\$\{?(\w+)(?::-(\w+))?\}?",
                               lambda m: PLACEHOLDERS.get(m.group(1), m.group(2) or ""), command))
    env = {}
    while "=" in words[0] and words[0] != "deepspeed":
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0] == "deepspeed", command
    return env, words[1:]


def test_readme_launcher_commands_parse_with_deepspeed_and_our_entry():
    from deepspeed.launcher.runner import parse_args

    from megatron_tinyllama.config import load_config
    from megatron_tinyllama.train.pretrain import build_parser

    commands = readme_deepspeed_commands()
    assert len(commands) >= 4 and sum(c.startswith("DS_ACCELERATOR=cpu") for c in commands) == 1
    for command in commands:
        _env, argv = _argv(command)
        try:
            args = parse_args(argv)
        except SystemExit:
            pytest.fail(f"deepspeed's runner rejects the README command: {command}")
        assert args.module and args.user_script == "megatron_tinyllama.train.pretrain", command
        if args.no_ssh:  # the runner asserts 0 <= node_rank < nodes; -1 is its "not given"
            assert args.node_rank >= 0, f"--no_ssh without --node_rank: {command}"
        entry = build_parser().parse_args(args.user_args)
        if entry.config.startswith("examples/"):
            cfg = load_config(REPO_ROOT / entry.config, entry.override + entry.overrides)
            assert cfg.parallel.expected_world_size, f"no world declared: {command}"


def _prepare_demo_layout(folder: Path, corpus) -> None:
    """What the CPU command names, where ``tinyllama-demo`` leaves it (a tiny recipe here)."""
    demo = folder / "runs" / "demo"
    demo.mkdir(parents=True)
    write_local_hostfile(demo / "hostfile", nodes=1, slots_per_node=2)
    recipe = {
        "name": "readme-cpu",
        "model": {"preset": "tinyllama-debug", "vocab_size": 1024},
        "parallel": {"expected_world_size": 2},
        "data": {"blend": f"1.0 {corpus.text_prefix}", "tokenizer_model": str(corpus.tokenizer_model)},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_tokens": 1024},
        "train": {"train_tokens": 3 * 1024, "global_batch_tokens": 1024, "micro_batch_size": 4,
                  "precision": "fp32"},
        "logging": {"log_interval_steps": 1},
    }
    (demo / "recipe.yaml").write_text(yaml.safe_dump(recipe))


def _run(command: str, cwd: Path, port: int) -> subprocess.CompletedProcess:
    env = {**launcher_env(), "MASTER_PORT": str(port)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_readme_cpu_command_runs_as_written_and_stops_early_without_its_hostfile(tmp_path,
                                                                                 small_corpus):
    (command,) = [c for c in readme_deepspeed_commands() if c.startswith("DS_ACCELERATOR=cpu")]
    _prepare_demo_layout(tmp_path, small_corpus)
    result = _run(command, tmp_path, free_port())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    _env, argv = _argv(command)
    (save_dir,) = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint.save_dir=")]
    metrics = tmp_path / save_dir / "metrics.jsonl"
    records = metrics.read_text()
    assert [json.loads(r)["step"] for r in records.splitlines() if "train_loss" in r] == [1, 2, 3]
    assert "DP=2" in result.stdout + result.stderr

    # The same command without its hostfile: deepspeed only warns and starts one local rank;
    # the recipe's declared world stops it before any set-up, with the reason.
    (tmp_path / "runs" / "demo" / "hostfile").unlink()
    result = _run(command, tmp_path, free_port())
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert "Unable to find hostfile" in output  # deepspeed's own warning, then ours:
    assert "the launcher started 1 rank (1 node of 1) but parallel.expected_world_size=2" in output
    assert "--hostfile" in output and metrics.read_text() == records
