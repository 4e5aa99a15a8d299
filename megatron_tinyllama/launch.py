"""Start the pretraining entry through the real ``deepspeed`` launcher (used by the demo and tests).

On a cluster users type the launcher command themselves; this module only builds the same command
for one machine: a hostfile of local "nodes", ``--no_ssh`` with one launcher per simulated node, and
``DS_ACCELERATOR=cpu`` when there is no GPU.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

# Distinct names for simulated nodes on one machine; all resolve to the loopback interface.
_LOCAL_HOST_NAMES = ("localhost", "127.0.0.1", "127.0.0.2", "127.0.0.3")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_local_hostfile(path: Path, nodes: int, slots_per_node: int) -> Path:
    """A hostfile describing ``nodes`` simulated nodes on this machine."""
    if nodes > len(_LOCAL_HOST_NAMES):
        raise ValueError(f"at most {len(_LOCAL_HOST_NAMES)} simulated nodes")
    path.write_text("".join(f"{_LOCAL_HOST_NAMES[i]} slots={slots_per_node}\n" for i in range(nodes)))
    return path


def launcher_env() -> dict[str, str]:
    env = dict(os.environ)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def deepspeed_command(hostfile: Path, node_rank: int, master_port: int, config: Path,
                      overrides: Sequence[str] = ()) -> list[str]:
    """The launcher command for one simulated node."""
    launcher = shutil.which("deepspeed") or "deepspeed"
    return [
        launcher, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
        "--master_addr", "127.0.0.1", "--master_port", str(master_port),
        "--module", "megatron_tinyllama.train.pretrain", "--config", str(config), *overrides,
    ]


def launch_local(config: Path, *, nodes: int = 1, ranks_per_node: int = 2, work_dir: Path,
                 overrides: Sequence[str] = (), timeout_s: Optional[float] = None,
                 log_path: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run the deepspeed launcher for ``nodes`` x ``ranks_per_node`` local ranks and wait.

    Returns the last launcher's completed process (its output, when ``log_path`` is None, is
    captured); raises ``subprocess.CalledProcessError`` if any launcher fails.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    hostfile = write_local_hostfile(work_dir / "hostfile", nodes, ranks_per_node)
    port = free_port()
    env = launcher_env()
    procs = []
    logs = []
    for node_rank in range(nodes):
        cmd = deepspeed_command(hostfile, node_rank, port, config, overrides)
        log = open(log_path.with_suffix(f".node{node_rank}.log"), "w") if log_path else None
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log or subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout_s)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out or "", ""))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for log in logs:
            if log:
                log.close()
    for result in results:
        if result.returncode != 0:
            text = result.stdout if not log_path else Path(log_path.with_suffix(".node0.log")).read_text()
            sys.stderr.write(text[-6000:])
            raise subprocess.CalledProcessError(result.returncode, result.args, output=text)
    return results[0]
