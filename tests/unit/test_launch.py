"""Launcher helpers: hostfiles are checked before deepspeed reads them, and the pretraining entry
refuses a world other than the one the recipe declares."""

from __future__ import annotations

import pytest

from megatron_tinyllama.config import ConfigError, config_from_dict
from megatron_tinyllama.launch import HostfileError, deepspeed_command, read_hostfile

BAD_HOSTFILES = {
    "no slots": ("node-001 slots=4\nnode-002\n", 2, "expected 'hostname slots=<count>'"),
    "slots not a number": ("node-001 slots=four\n", 1, "slots='four' is not a positive integer"),
    "slots zero": ("# two nodes\nnode-001 slots=4\nnode-002 slots=0\n", 3,
                   "slots='0' is not a positive integer"),
    "slots fraction": ("node-001 slots=4.5\n", 1, "slots='4.5' is not a positive integer"),
    "trailing words": ("node-001 slots=4 gpus=8\n", 1, "expected 'hostname slots=<count>'"),
    "duplicate host": ("node-001 slots=4\n\nnode-001 slots=4\n", 3,
                       "node-001 is listed again (first on line 1)"),
}


@pytest.mark.parametrize("name", list(BAD_HOSTFILES))
def test_malformed_hostfile_is_named_with_its_line(tmp_path, name):
    text, line, message = BAD_HOSTFILES[name]
    path = tmp_path / "hostfile"
    path.write_text(text)
    with pytest.raises(HostfileError) as info:
        read_hostfile(path)
    assert str(info.value).startswith(f"{path}:{line}: ") and message in str(info.value)
    with pytest.raises(HostfileError):  # the command builder checks what it is given
        deepspeed_command(path, 0, 29500, tmp_path / "recipe.yaml")


def test_missing_and_empty_hostfiles_are_errors(tmp_path):
    with pytest.raises(HostfileError, match=rf"{tmp_path}/hostfile: no such file \(deepspeed would "
                                            rf"fall back to this machine's devices"):
        read_hostfile(tmp_path / "hostfile")
    (tmp_path / "hostfile").write_text("# nothing but a comment\n\n")
    with pytest.raises(HostfileError, match=rf"{tmp_path}/hostfile: lists no host"):
        read_hostfile(tmp_path / "hostfile")


def test_good_hostfile_reads_like_deepspeed(tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile

    path = tmp_path / "hostfile"
    path.write_text("# cluster\nnode-001 slots=8\n\n  node-002   slots=8  # second box\n")
    assert read_hostfile(path) == {"node-001": 8, "node-002": 8} == dict(fetch_hostfile(str(path)))


def test_pretrain_refuses_a_world_other_than_the_recipe_declares(tmp_path, monkeypatch, capsys):
    from megatron_tinyllama.parallel.init import check_launched_world
    from megatron_tinyllama.train.pretrain import main

    parallel = config_from_dict({"parallel": {"expected_world_size": 16}}).parallel
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_SIZE", "8")
    with pytest.raises(ConfigError, match=r"launcher started 8 ranks \(1 node of 8\) but "
                                          r"parallel\.expected_world_size=16"):
        check_launched_world(parallel)
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert check_launched_world(parallel).world_size == 16
    assert check_launched_world(config_from_dict({}).parallel).world_size == 16  # not declared
    with pytest.raises(ConfigError, match="parallel.expected_world_size=0: must be >= 1"):
        config_from_dict({"parallel": {"expected_world_size": 0}})
    # The entry checks it before anything else: exit 2, the field named.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("parallel:\n  expected_world_size: 2\n")
    assert main(["--config", str(recipe)]) == 2
    assert "parallel.expected_world_size=2" in capsys.readouterr().err


def test_the_preflight_refuses_a_hostfile_that_starts_no_rank(tmp_path, capsys):
    """deepspeed itself starts no process for slots=0 and exits 0 (its reader takes the line)."""
    from deepspeed.launcher.runner import fetch_hostfile

    from megatron_tinyllama.launch import check_hostfile_main

    path = tmp_path / "hostfile"
    path.write_text("node-001 slots=0\n")
    assert dict(fetch_hostfile(str(path))) == {"node-001": 0}  # the fault: deepspeed accepts it
    assert check_hostfile_main([str(path), "--expected-world-size", "2"]) == 2
    assert f"error: {path}:1: slots='0' is not a positive integer" in capsys.readouterr().err
    path.write_text("node-001 slots=8\nnode-002 slots=8\n")
    assert check_hostfile_main([str(path), "--expected-world-size", "8"]) == 2
    assert "2 hosts with 16 slots in all, but --expected-world-size 8" in capsys.readouterr().err
    assert check_hostfile_main([str(path), "--expected-world-size", "16"]) == 0
    assert capsys.readouterr().out == f"{path}: 2 hosts, 16 ranks\n"


def _gpus(monkeypatch, count: int) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_more_local_ranks_than_visible_gpus_stop_at_start_naming_both(tmp_path, monkeypatch, capsys):
    """deepspeed's runner never compares a hostfile's slots with the GPUs: slots=2 on a one-GPU
    machine started rank 1, whose torch.cuda.set_device(1) failed with 'invalid device ordinal'.
    Every rank refuses it at start (exit 2), naming both numbers."""
    from megatron_tinyllama.parallel.init import check_launched_world, initialize_distributed
    from megatron_tinyllama.train.pretrain import main

    parallel = config_from_dict({}).parallel
    _gpus(monkeypatch, 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # what the runner sets for slots=2
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        with pytest.raises(ConfigError, match=r"started 2 local ranks on this node but 1 GPU is visible "
                                              r"\(CUDA_VISIBLE_DEVICES=0,1\).*slots=1"):
            check_launched_world(parallel)
        with pytest.raises(ConfigError, match="2 local ranks"):  # before torch.cuda.set_device
            initialize_distributed()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("parallel:\n  seed: 1\n")
    assert main(["--config", str(recipe)]) == 2
    assert "2 local ranks on this node but 1 GPU is visible" in capsys.readouterr().err
    _gpus(monkeypatch, 2)
    assert check_launched_world(parallel).local_world_size == 2  # one rank per GPU is fine
    _gpus(monkeypatch, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert check_launched_world(parallel).world_size == 4  # CPU ranks share the cores


@pytest.mark.parametrize("gpus,ranks,why", [
    (0, 2, "no GPU: 2 CPU ranks with gloo"),
    (1, 1, "one per visible GPU (1)"),
    (2, 2, "one per visible GPU (2)"),
    (8, 2, "2 of the 8 visible GPUs: train.global_batch_tokens=2048 splits over at most 2 ranks"),
])
def test_demo_picks_its_ranks_from_the_machine_and_says_why(monkeypatch, gpus, ranks, why):
    from megatron_tinyllama.config import load_config
    from megatron_tinyllama.demo import REPO_EXAMPLES, default_local_ranks

    _gpus(monkeypatch, gpus)
    cfg = load_config(REPO_EXAMPLES / "demo_cpu.yaml", [])
    got, reason = default_local_ranks(cfg)
    assert got == ranks and reason.startswith(why)


def test_demo_refuses_more_ranks_than_gpus_before_building_anything(tmp_path, monkeypatch, capsys):
    from megatron_tinyllama.demo import main

    _gpus(monkeypatch, 1)
    assert main(["--work-dir", str(tmp_path / "demo"), "--ranks", "2"]) == 2
    assert "--ranks 2 is more than the 1 visible GPU: one rank per GPU" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_a_master_port_in_use_is_named_before_the_launchers_start_and_in_the_ranks(tmp_path, monkeypatch):
    """Another process listens on the port: the command builder, and so launch_local (the demo, the
    local pipeline), refuse before starting anything, and rank 0's store start says the same in one
    line instead of torch's DistNetworkError traceback."""
    import socket
    import subprocess

    import torch.distributed as dist

    from megatron_tinyllama import launch
    from megatron_tinyllama.parallel.init import named_port_in_use

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.2 slots=1\n")
    with socket.socket() as other_job:
        other_job.bind(("", 0))
        other_job.listen()
        port = other_job.getsockname()[1]
        refused = (rf"^MASTER_PORT {port} is already in use on this machine .*pick another port, "
                   rf"e\.g\. deepspeed --master_port N")
        with pytest.raises(launch.PortInUseError, match=refused):
            deepspeed_command(hostfile, 0, port, tmp_path / "recipe.yaml")
        deepspeed_command(hostfile, 1, port, tmp_path / "recipe.yaml")  # node 1 hosts no store
        deepspeed_command(hostfile, 0, port, tmp_path / "recipe.yaml", check_port=False)  # shown only

        def no_launcher(*args, **kwargs):
            raise AssertionError("a launcher was started")

        monkeypatch.setattr(launch, "free_port", lambda: port)  # as if another job took it since
        monkeypatch.setattr(subprocess, "Popen", no_launcher)
        with pytest.raises(launch.PortInUseError, match=refused):
            launch.launch_local(tmp_path / "recipe.yaml", nodes=2, ranks_per_node=1, work_dir=tmp_path / "w")
        monkeypatch.undo()

        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        with pytest.raises(ConfigError, match=rf"^MASTER_PORT {port} is already in use on 127\.0\.0\.1 "):
            with named_port_in_use():  # what rank 0's init_process_group starts, and its error
                dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    free = deepspeed_command(hostfile, 0, port, tmp_path / "recipe.yaml")  # released: fine
    assert free[free.index("--master_port") + 1] == str(port)
