"""The elastic run's bookkeeping without a cluster: the agent's environment, the settings that keep a
run from healing, and the world change named from two starts' node lists."""

from __future__ import annotations

import json

import pytest

from megatron_tinyllama.elastic import (
    WORLD_FILE,
    ElasticEnv,
    ElasticEnvError,
    compare_worlds,
    read_elastic_env,
    read_world_file,
    setup_problems,
    write_world_file,
)

AGENT_ENV = {"TORCHELASTIC_RUN_ID": "v1", "TORCHELASTIC_RESTART_COUNT": "2",
             "TORCHELASTIC_MAX_RESTARTS": "100", "GROUP_RANK": "1",
             "TORCHELASTIC_USE_AGENT_STORE": "False"}


def test_the_agents_environment_is_read_and_its_absence_is_none():
    env = read_elastic_env(AGENT_ENV)
    assert (env.run_id, env.restart_count, env.max_restarts, env.group_rank) == ("v1", 2, 100, 1)
    assert not env.shares_agent_store and "agent pid" in env.node
    assert read_elastic_env({"RANK": "0", "WORLD_SIZE": "2"}) is None  # the deepspeed launcher
    with pytest.raises(ElasticEnvError, match="TORCHELASTIC_RESTART_COUNT='x'"):
        read_elastic_env({**AGENT_ENV, "TORCHELASTIC_RESTART_COUNT": "x"})


def test_settings_that_keep_a_node_from_rejoining_are_named():
    shared = read_elastic_env({**AGENT_ENV, "TORCHELASTIC_USE_AGENT_STORE": "True",
                               "TORCHELASTIC_MAX_RESTARTS": "0"})
    problems = setup_problems(shared, save_dir=None)
    assert len(problems) == 3
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in problems[0] and "role_info" in problems[0]
    assert "--max-restarts=0" in problems[1] and "checkpoint.save_dir" in problems[2]
    assert setup_problems(read_elastic_env(AGENT_ENV), save_dir="runs/v1") == []


def test_a_lost_node_and_a_node_that_came_back_are_named():
    a, b, b2 = "n1 (agent pid 10)", "n2 (agent pid 11)", "n2 (agent pid 12)"
    first = compare_worlds(None, [a, b], 2, resumed_step=0, last_step=None,
                           checkpoint_world_size=None, restart_count=0)
    assert not first.changed and first.previous_world_size is None
    lost = compare_worlds({"world_size": 2, "nodes": [a, b]}, [a], 1, resumed_step=30, last_step=36,
                          checkpoint_world_size=2, restart_count=1)
    assert lost.changed and lost.lost == (b,) and lost.joined == ()
    assert lost.message() == ("world 2 -> 1: node n2 (agent pid 11) lost after step 36; resumed "
                              "from step 30 (saved by 2 ranks)")
    back = compare_worlds({"world_size": 1, "nodes": [a]}, [a, b2], 2, resumed_step=40,
                          last_step=None, checkpoint_world_size=1, restart_count=1)
    assert back.joined == (b2,) and back.message().startswith("world 1 -> 2: node n2 (agent pid 12) joined")
    record = back.record()
    assert (record["event"], record["world_size"], record["previous_world_size"], record["step"]) == \
        ("world", 2, 1, 40)
    same = compare_worlds({"world_size": 2, "nodes": [a, b]}, [a, b], 2, resumed_step=8, last_step=8,
                          checkpoint_world_size=2, restart_count=3)
    assert not same.changed and "the same nodes, restarted" in same.message()
    assert same.last_step is None  # nothing was logged past the checkpoint


def test_the_world_file_round_trips_and_a_bad_one_is_named(tmp_path, caplog):
    env = ElasticEnv(run_id="v1", restart_count=1, max_restarts=3, group_rank=0, agent_pid=7,
                     shares_agent_store=False)
    change = compare_worlds(None, ["n1 (agent pid 7)"], 1, resumed_step=5, last_step=None,
                            checkpoint_world_size=2, restart_count=1)
    write_world_file(tmp_path, env, change)
    assert read_world_file(tmp_path)["nodes"] == ["n1 (agent pid 7)"]
    (tmp_path / WORLD_FILE).write_text(json.dumps({"world_size": 2}))
    assert read_world_file(tmp_path) is None
    assert WORLD_FILE in caplog.text and "'nodes'" in caplog.text
    assert read_world_file(tmp_path / "absent") is None


def test_the_readmes_torchrun_lines_parse_with_torchrun_and_our_entry():
    """The README's elastic commands, as torchrun's own parser and our entry read them."""
    import re
    import shlex
    from pathlib import Path

    from torch.distributed.run import get_args_parser

    from megatron_tinyllama.train.pretrain import build_parser

    text = (Path(__file__).parents[2] / "README.md").read_text()
    section = text.split("### Elastic runs", 1)[1].split("\n### ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0].replace("\\\n", " ")
    lines = [line.split("torchrun ", 1)[1].rstrip().rstrip('"') for line in block.splitlines()
             if "torchrun " in line and not line.lstrip().startswith("#")]
    assert len(lines) == 2  # SLURM and pdsh
    for line in lines:
        for var, value in (("$(wc -l < hostfile)", "4"), ("$SLURM_NNODES", "4"),
                           ("$STORE", "login-01:29400"), ("$SLURM_JOB_ID", "7")):
            line = line.replace(var, value)
        args = get_args_parser().parse_args(shlex.split(line))
        assert args.rdzv_backend == "c10d" and ":" in args.nnodes and args.max_restarts >= 1
        keys = dict(kv.split("=") for kv in args.rdzv_conf.split(","))
        # The keys the c10d rendezvous reads (torch/distributed/elastic/rendezvous/dynamic_rendezvous.py).
        assert set(keys) <= {"join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout",
                             "keep_alive_interval", "keep_alive_max_attempt"}
        assert args.module and args.training_script == "megatron_tinyllama.train.pretrain"
        ours = build_parser().parse_args(args.training_script_args)
        assert ours.config.endswith(".yaml") and ours.overrides


def test_the_step_the_previous_world_reached_and_the_world_event_reach_metrics(tmp_path):
    """What :func:`record_world` reads and writes through the metrics writer (rank 0)."""
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.train.metrics import MetricsWriter, RunStart

    cfg = config_from_dict({"name": "e", "model": {"preset": "tinyllama-debug"},
                            "checkpoint": {"save_dir": str(tmp_path)}})
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "train_loss": 5.0}) + "\n" for s in range(1, 10)) + '{"step": 10, "tr')
    writer = MetricsWriter(cfg, 0, 1, start=RunStart("resume", 6, 6 * 1024, "global_step000006"))
    assert writer.superseded_last_step == 9  # the cut line is moved aside too, but names no step
    change = compare_worlds({"world_size": 2, "nodes": ["a", "b"]}, ["a"], 1, resumed_step=6,
                            last_step=writer.superseded_last_step, checkpoint_world_size=2,
                            restart_count=1)
    writer.log_event(change.record())
    writer.close()
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "world" and last["message"].startswith("world 2 -> 1: node b lost after step 9")
    assert MetricsWriter(cfg, 0, 1, start=RunStart("resume", 9, 9 * 1024)).superseded_last_step is None
