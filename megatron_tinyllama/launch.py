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
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO

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
                 log_path: Optional[Path] = None,
                 on_line: Optional[Callable[[str], None]] = None) -> subprocess.CompletedProcess:
    """Run the deepspeed launcher for ``nodes`` x ``ranks_per_node`` local ranks and wait.

    Args:
        log_path: write each launcher's whole output to ``<log_path stem>.node<i>.log``; without
            it the output is captured and returned.
        on_line: called with every output line of every launcher as it arrives (from reader
            threads, one call at a time), e.g. to show progress; needs ``log_path``, which still
            receives everything.

    Returns:
        The first launcher's completed process (its ``stdout`` when captured).

    Raises:
        subprocess.CalledProcessError: if any launcher fails (without ``on_line``, the tail of its
            output is written to stderr first).
        subprocess.TimeoutExpired: ``timeout_s`` passed; every launcher is killed.
    """
    if on_line is not None and log_path is None:
        raise ValueError("on_line needs log_path: the full output must be kept in a file")
    work_dir.mkdir(parents=True, exist_ok=True)
    hostfile = write_local_hostfile(work_dir / "hostfile", nodes, ranks_per_node)
    port = free_port()
    env = launcher_env()
    procs, logs, readers = [], [], []
    lock = threading.Lock()

    def pump(stream: TextIO, log: TextIO) -> None:
        for line in stream:
            log.write(line)
            log.flush()
            with lock:
                on_line(line)

    try:
        for node_rank in range(nodes):
            cmd = deepspeed_command(hostfile, node_rank, port, config, overrides)
            log = open(log_path.with_suffix(f".node{node_rank}.log"), "w") if log_path else None
            logs.append(log)
            stdout = subprocess.PIPE if (log is None or on_line is not None) else log
            proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT,
                                    text=True, errors="replace")
            procs.append(proc)
            if on_line is not None:
                reader = threading.Thread(target=pump, args=(proc.stdout, log), daemon=True)
                reader.start()
                readers.append(reader)
        results = []
        for proc in procs:
            if on_line is not None:
                proc.wait(timeout=timeout_s)
                out = ""
            else:
                out, _ = proc.communicate(timeout=timeout_s)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out or "", ""))
        for reader in readers:
            reader.join()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for reader in readers:
            reader.join(timeout=5)
        for log in logs:
            if log:
                log.close()
    for node_rank, result in enumerate(results):
        if result.returncode != 0:
            text = (result.stdout if not log_path
                    else log_path.with_suffix(f".node{node_rank}.log").read_text())
            if on_line is None:  # otherwise the caller has seen every line already
                sys.stderr.write(text[-6000:])
            raise subprocess.CalledProcessError(result.returncode, result.args, output=text)
    return results[0]
