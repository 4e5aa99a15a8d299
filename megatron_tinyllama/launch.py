"""Start the pretraining entry through the real ``deepspeed`` launcher (used by the demo and tests).

On a cluster users type the launcher command themselves; this module only builds the same command
for one machine: a hostfile of local "nodes", ``--no_ssh`` with one launcher per simulated node, and
``DS_ACCELERATOR=cpu`` when there is no GPU.

It also owns checking a hostfile before deepspeed reads it (:func:`read_hostfile`). deepspeed's
runner warns about a missing hostfile and goes on with this machine's devices alone, accepts
``slots=0`` (and then starts no process and exits 0) or ``slots=4.5`` (as 4), and reports a bad
line as a traceback without its line number. The commands built here always pass
``parallel.expected_world_size`` too, which the pretraining entry checks against the world the
launcher really started (see :func:`megatron_tinyllama.parallel.init.check_launched_world`).

A hostfile that yields no rank at all (every host ``slots=0``) cannot be caught by the ranks: deepspeed
then starts none and exits 0. :func:`check_hostfile_main` (``tinyllama-check-hostfile``) is the
preflight for users who type the deepspeed command themselves.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO, Union

# Distinct names for simulated nodes on one machine; all resolve to the loopback interface.
_LOCAL_HOST_NAMES = ("localhost", "127.0.0.1", "127.0.0.2", "127.0.0.3")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HostfileError(ValueError):
    """A hostfile that is missing or malformed: names the file and the line."""


def port_in_use_message(port: int | str, host: str = "this machine") -> str:
    """The one line for a rendezvous port that another process holds (launcher and ranks alike)."""
    return (f"MASTER_PORT {port} is already in use on {host} (another job's rendezvous, or ranks of "
            f"an earlier run still running): pick another port, e.g. deepspeed --master_port N "
            f"(torchrun --master-port N) with N free: python -c \"import socket; s = "
            f"socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])\"")


class PortInUseError(ValueError):
    """The rendezvous port is taken on the machine that would host the store."""


def check_port_free(port: int) -> None:
    """Refuse ``port`` when a process listens on it here, as torch's rendezvous store would
    (which otherwise fails in rank 0 with a ``DistNetworkError`` traceback while the other ranks
    wait, or lets them join another job's store).

    Raises:
        PortInUseError: naming the port and how to pick another.
    """
    with socket.socket() as sock:
        # As the store binds: SO_REUSEADDR, so that a port left in TIME_WAIT by a finished run
        # is not taken for one in use; a listening socket still refuses the bind.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise PortInUseError(port_in_use_message(port)) from None
            raise


_SLOTS = re.compile(r"slots=(\S*)$")


def read_hostfile(path: Union[str, Path]) -> dict[str, int]:
    """Hosts and their slots from a deepspeed hostfile, checked line by line.

    Lines are ``hostname slots=<count>``; blank lines and ``#`` comments (also after an entry)
    are ignored. Stricter than deepspeed's own reader, which runs on local devices when the file
    is missing and reads ``slots=4.5`` as 4 or ``slots=0`` as a node to start nothing on.

    Raises:
        HostfileError: A missing file, a line of another shape, a count that is not a positive
            integer, a host listed twice, or no host at all; named as ``file:line``.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise HostfileError(f"{path}: no such file (deepspeed would fall back to this machine's "
                            f"devices, with only a warning)") from None
    except OSError as err:
        raise HostfileError(f"{path}: cannot read ({err.strerror})") from None
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}:{number}"
        slots = _SLOTS.match(fields[1]) if len(fields) == 2 else None
        if slots is None:
            raise HostfileError(f"{where}: {line.strip()!r}: expected 'hostname slots=<count>'")
        count = slots.group(1)
        if not count.isdigit() or int(count) < 1:
            raise HostfileError(f"{where}: slots={count!r} is not a positive integer")
        host = fields[0]
        if host in hosts:
            raise HostfileError(f"{where}: {host} is listed again (first on line "
                                f"{first_line[host]})")
        hosts[host], first_line[host] = int(count), number
    if not hosts:
        raise HostfileError(f"{path}: lists no host")
    return hosts


def check_hostfile_main(argv: Optional[Sequence[str]] = None) -> int:
    """``tinyllama-check-hostfile HOSTFILE [--expected-world-size N]``: exit 0 when deepspeed would
    start ranks as declared, 2 (with ``FILE:LINE: ...``) otherwise; run it before ``deepspeed``."""
    parser = argparse.ArgumentParser(
        description="Check a deepspeed hostfile before launching: deepspeed itself starts no rank "
                    "and exits 0 for slots=0, reads slots=4.5 as 4 and runs on local devices "
                    "when the file is missing.")
    parser.add_argument("hostfile")
    parser.add_argument("--expected-world-size", type=int, default=None,
                        help="the ranks the job needs (the recipe's parallel.expected_world_size)")
    args = parser.parse_args(argv)
    try:
        hosts = read_hostfile(args.hostfile)
    except HostfileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ranks = sum(hosts.values())
    if args.expected_world_size is not None and ranks != args.expected_world_size:
        print(f"error: {args.hostfile}: {len(hosts)} hosts with {ranks} slots in all, but "
              f"--expected-world-size {args.expected_world_size}", file=sys.stderr)
        return 2
    print(f"{args.hostfile}: {len(hosts)} host{'s' if len(hosts) > 1 else ''}, {ranks} ranks")
    return 0


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
                      overrides: Sequence[str] = (), *, check_port: bool = True) -> list[str]:
    """The launcher command for one simulated node of ``hostfile`` (checked first).

    ``parallel.expected_world_size`` is set to the hostfile's total slots (before ``overrides``,
    which may change it), so that a world other than the hostfile's stops the run at start. For
    node 0, which hosts the rendezvous store here, ``master_port`` must be free
    (``check_port=False``: a command only shown, not run now).

    Raises:
        HostfileError: See :func:`read_hostfile`; or ``node_rank`` names no line of it.
        PortInUseError: ``master_port`` is in use on this machine.
    """
    hosts = read_hostfile(hostfile)
    if not 0 <= node_rank < len(hosts):
        raise HostfileError(f"{hostfile}: node rank {node_rank} is not among its {len(hosts)} "
                            f"hosts")
    if check_port and node_rank == 0:
        check_port_free(master_port)
    launcher = shutil.which("deepspeed") or "deepspeed"
    return [
        launcher, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
        "--master_addr", "127.0.0.1", "--master_port", str(master_port),
        "--module", "megatron_tinyllama.train.pretrain", "--config", str(config),
        f"parallel.expected_world_size={sum(hosts.values())}", *overrides,
    ]


def launch_local(config: Path, *, nodes: int = 1, ranks_per_node: int = 2, work_dir: Path,
                 overrides: Sequence[str] = (), timeout_s: Optional[float] = None,
                 log_path: Optional[Path] = None,
                 hostfile: Optional[Path] = None,
                 on_line: Optional[Callable[[str], None]] = None) -> subprocess.CompletedProcess:
    """Run the deepspeed launcher for ``nodes`` x ``ranks_per_node`` local ranks and wait.

    Args:
        hostfile: its hosts are the simulated nodes instead (it is checked first, see
            :func:`read_hostfile`; the names must resolve to this machine).
        log_path: write each launcher's whole output to ``<log_path stem>.node<i>.log``; without
            it the output is captured and returned.
        on_line: called with every output line of every launcher as it arrives (from reader
            threads, one call at a time), e.g. to show progress; needs ``log_path``, which still
            receives everything.

    Returns:
        The first launcher's completed process (its ``stdout`` when captured).

    Raises:
        PortInUseError: the port chosen is taken before the launchers start (nothing started).
        subprocess.CalledProcessError: if any launcher fails (without ``on_line``, the tail of its
            output is written to stderr first).
        subprocess.TimeoutExpired: ``timeout_s`` passed; every launcher is killed.
    """
    if on_line is not None and log_path is None:
        raise ValueError("on_line needs log_path: the full output must be kept in a file")
    work_dir.mkdir(parents=True, exist_ok=True)
    if hostfile is None:
        hostfile = write_local_hostfile(work_dir / "hostfile", nodes, ranks_per_node)
    nodes = len(read_hostfile(hostfile))
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

    commands = [deepspeed_command(hostfile, node_rank, port, config, overrides)  # checked first
                for node_rank in range(nodes)]
    try:
        for node_rank, cmd in enumerate(commands):
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
