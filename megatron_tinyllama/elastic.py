"""This module owns running under torch's elastic agent: ``torchrun --nnodes=MIN:MAX``.

One agent per node (torchrun) meets the others in a c10d rendezvous and starts this node's ranks.
When a rank fails (its node lost, a collective broken, the stall watchdog's exit 4) every agent
stops its ranks, the agents that are left meet again, and each starts its ranks anew on the world
they formed; when a node comes back, the agents see it waiting and do the same at full size. Each
new start resumes from the last complete checkpoint on whatever world it got (the checkpoint is
resharded; the global batch and the data order stay, the accumulation per rank changes).

What is ours to do, in the ranks:

* read the agent's environment (:func:`read_elastic_env`);
* name the settings under which a run cannot heal (:func:`setup_problems`): torch 2.13's
  rendezvous cannot take a node back while the agents share their store with the ranks;
* name every world change, in one log line and one ``metrics.jsonl`` event
  (:func:`record_world`): ``world 2 -> 1: node gpu7 (agent pid 4242) lost after step 36;
  resumed from step 30``. The nodes of each start are kept in ``save_dir/elastic_world.json``;
* serve the rendezvous store from a process that is not one of the nodes (:func:`serve_store`,
  ``python -m megatron_tinyllama.elastic store --port 29400``): the agent that hosts it otherwise
  takes the whole job down when its node is lost.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

WORLD_FILE = "elastic_world.json"
"""In ``checkpoint.save_dir``: the world of the last start under the agent (rank 0 writes it)."""

SHARED_STORE_ISSUE = "https://github.com/pytorch/pytorch/issues/147064"


class ElasticEnvError(ValueError):
    """The agent's environment holds a value that is not what torchrun writes."""


@dataclass(frozen=True)
class ElasticEnv:
    """Where this rank's node stands with the agents, as torchrun told it."""

    run_id: str
    """``--rdzv-id`` (TORCHELASTIC_RUN_ID)."""
    restart_count: int
    """Restarts of the worker group so far (TORCHELASTIC_RESTART_COUNT); a node joining counts none."""
    max_restarts: int
    """``--max-restarts`` (TORCHELASTIC_MAX_RESTARTS)."""
    group_rank: int
    """This node's rank in the current rendezvous round (GROUP_RANK)."""
    agent_pid: int
    """The agent (torchrun) that started this rank: the parent process."""
    shares_agent_store: bool
    """The ranks use the agent's own TCP store (TORCHELASTIC_USE_AGENT_STORE)."""

    @property
    def node(self) -> str:
        """This node's name: host and agent, so that two agents on one host (or a node started
        again) are told apart."""
        return f"{socket.gethostname()} (agent pid {self.agent_pid})"


def _int(environ: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    value = environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ElasticEnvError(f"environment variable {name}={value!r}: expected an integer (set by "
                              f"torchrun's elastic agent)") from None


def read_elastic_env(environ: Optional[Mapping[str, str]] = None) -> Optional[ElasticEnv]:
    """The agent's view of this rank; None when torchrun's agent did not start it.

    Raises:
        ElasticEnvError: a variable torchrun sets is not an integer (naming it).
    """
    environ = os.environ if environ is None else environ
    run_id = environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return None
    return ElasticEnv(
        run_id=run_id,
        restart_count=_int(environ, "TORCHELASTIC_RESTART_COUNT", 0),
        max_restarts=_int(environ, "TORCHELASTIC_MAX_RESTARTS", 0),
        group_rank=_int(environ, "GROUP_RANK", 0),
        agent_pid=os.getppid(),
        shares_agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
    )


def setup_problems(env: ElasticEnv, save_dir: Optional[str]) -> list[str]:
    """The settings of this job that keep it from healing, one sentence each (rank 0 logs them)."""
    problems = []
    if env.shares_agent_store:
        # Seen here on torch 2.13: after a node was lost and came back, the survivor's agent
        # (rank 0 of the next round) does not publish the store's address for the new round, the
        # returning agent waits for it, and both time out (DistStoreError on
        # torchelastic/role_info); the job exits 1.
        problems.append(
            "the ranks share torchrun's rendezvous store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE is not "
            "1): if this run is elastic (--nnodes=MIN:MAX), a node lost can be left behind but one "
            "that comes back cannot rejoin (the next rendezvous times out on torchelastic/role_info, "
            f"{SHARED_STORE_ISSUE}); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun on "
            "every node")
    if env.max_restarts < 1:
        problems.append("torchrun --max-restarts=0: the first failure ends the job (for an elastic "
                        "run give it room: a lost node costs the nodes left one restart each time)")
    if not save_dir:
        problems.append("checkpoint.save_dir is not set: every restart begins again from step 0")
    return problems


@dataclass(frozen=True)
class WorldChange:
    """How this start's world differs from the previous start's (the same run's save_dir)."""

    previous_world_size: Optional[int]
    """Ranks at the previous start; None at the first."""
    world_size: int
    nodes: tuple[str, ...]
    """This start's nodes, by node rank."""
    lost: tuple[str, ...]
    joined: tuple[str, ...]
    resumed_step: int
    last_step: Optional[int]
    """The last step the previous world logged (None when nothing was logged past the resume)."""
    checkpoint_world_size: Optional[int]
    """Ranks that saved the checkpoint resumed from."""
    restart_count: int

    @property
    def changed(self) -> bool:
        return self.previous_world_size is not None and (
            self.previous_world_size != self.world_size or bool(self.lost or self.joined))

    def message(self) -> str:
        """``world 2 -> 1: node X lost after step 36; resumed from step 30 (saved by 2 ranks)``."""
        if self.previous_world_size is None:
            return (f"world {self.world_size} ({len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''}: "
                    f"{', '.join(self.nodes)})" + self._resumed())
        parts = []
        after = f" after step {self.last_step}" if self.last_step is not None else ""
        if self.lost:
            parts.append(f"{_nodes(self.lost)} lost{after}")
        if self.joined:
            parts.append(f"{_nodes(self.joined)} joined")
        if not parts:
            parts.append(f"the same nodes, restarted{after}")
        return (f"world {self.previous_world_size} -> {self.world_size}: {'; '.join(parts)}"
                + self._resumed())

    def _resumed(self) -> str:
        if self.checkpoint_world_size is None:
            return f"; started at step {self.resumed_step}"
        return (f"; resumed from step {self.resumed_step} (saved by {self.checkpoint_world_size} "
                f"rank{'s' if self.checkpoint_world_size != 1 else ''})")

    def record(self) -> dict:
        """The ``metrics.jsonl`` event."""
        return {"event": "world", "step": self.resumed_step, "world_size": self.world_size,
                "previous_world_size": self.previous_world_size, "nodes": list(self.nodes),
                "lost": list(self.lost), "joined": list(self.joined), "last_step": self.last_step,
                "checkpoint_world_size": self.checkpoint_world_size,
                "restart_count": self.restart_count, "message": self.message()}


def _nodes(names: Sequence[str]) -> str:
    return ("node " if len(names) == 1 else "nodes ") + ", ".join(names)


def compare_worlds(previous: Optional[dict], nodes: Sequence[str], world_size: int, *,
                   resumed_step: int, last_step: Optional[int],
                   checkpoint_world_size: Optional[int], restart_count: int) -> WorldChange:
    """This start's world against ``previous`` (the :data:`WORLD_FILE` payload, None at the first
    start). Pure: the nodes are compared by name."""
    before = list(previous.get("nodes", [])) if previous else []
    return WorldChange(
        previous_world_size=previous.get("world_size") if previous else None,
        world_size=world_size, nodes=tuple(nodes),
        lost=tuple(n for n in before if n not in nodes),
        joined=tuple(n for n in nodes if previous and n not in before),
        resumed_step=resumed_step,
        last_step=last_step if last_step is not None and last_step > resumed_step else None,
        checkpoint_world_size=checkpoint_world_size, restart_count=restart_count)


def read_world_file(save_dir: Path) -> Optional[dict]:
    """The previous start's world; None when absent or unreadable (then the change is not known:
    a warning names the file)."""
    path = Path(save_dir) / WORLD_FILE
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("%s: unreadable (%s); the world change of this start is not known", path, err)
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("nodes"), list):
        logger.warning("%s: not a world record (no 'nodes' list); the world change of this start is "
                       "not known", path)
        return None
    return payload


def write_world_file(save_dir: Path, env: ElasticEnv, change: WorldChange) -> None:
    """Replace :data:`WORLD_FILE` atomically (a kill leaves the old one or the new one)."""
    path = Path(save_dir) / WORLD_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"run_id": env.run_id, "restart_count": env.restart_count,
                               "world_size": change.world_size, "nodes": list(change.nodes),
                               "step": change.resumed_step}, indent=1) + "\n")
    os.replace(tmp, path)


def gather_nodes(env: ElasticEnv) -> list[str]:
    """Every node of this world by node rank (collective over the default group)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (env.group_rank, env.node))
    return [name for _, name in sorted(set(gathered))]


def record_world(save_dir: Optional[str], *, resumed_step: int, resumed_from: Optional[str],
                 metrics, env: Optional[ElasticEnv] = None) -> Optional[WorldChange]:
    """Under the elastic agent: name this start's world and how it changed (collective).

    Rank 0 logs one line (a warning when nodes were lost), appends a ``{"event": "world", ...}``
    record to ``metrics.jsonl`` and records the world in ``save_dir``; the other ranks only take
    part in gathering the nodes. Nothing happens outside the agent.

    Args:
        save_dir: ``checkpoint.save_dir`` (None: the change is logged, not recorded).
        resumed_step: the step this start trains on from.
        resumed_from: the checkpoint directory resumed from, when the run resumed.
        metrics: the run's :class:`~megatron_tinyllama.train.metrics.MetricsWriter`; its
            ``superseded_last_step`` is the last step the previous world logged.
    """
    import torch.distributed as dist

    env = env or read_elastic_env()
    if env is None:
        return None
    nodes = gather_nodes(env)
    if dist.get_rank() != 0:
        return None
    checkpoint_world = None
    if resumed_from:
        from megatron_tinyllama.checkpoint.manifest import read_trainer_state

        checkpoint_world = (read_trainer_state(Path(resumed_from)) or {}).get("world_size")
    previous = read_world_file(Path(save_dir)) if save_dir else None
    change = compare_worlds(previous, nodes, dist.get_world_size(), resumed_step=resumed_step,
                            last_step=getattr(metrics, "superseded_last_step", None),
                            checkpoint_world_size=checkpoint_world, restart_count=env.restart_count)
    restart = f"elastic restart {env.restart_count} of at most {env.max_restarts}: " \
        if env.restart_count else "elastic start: "
    (logger.warning if change.lost else logger.info)("%s%s", restart, change.message())
    metrics.log_event(change.record())
    if save_dir:
        write_world_file(Path(save_dir), env, change)
    return change


def serve_store(port: int, host: str = "0.0.0.0", ready: Optional[threading.Event] = None,
                stop: Optional[threading.Event] = None) -> None:
    """Serve a TCP store for ``torchrun --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT`` until
    SIGTERM/SIGINT (or ``stop``).

    Run it where no node of the job runs (a login or service host): the agents then all connect
    as clients, and any node may be lost. Otherwise the first agent binds the port and hosts the
    rendezvous; when its node is lost, every other agent fails with it.
    """
    import torch.distributed as dist

    # The agents' clients carry their own timeouts; the server's own only bounds its self-check.
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    print(f"rendezvous store serving on port {store.port}: torchrun --rdzv-backend=c10d "
          f"--rdzv-endpoint={socket.gethostname()}:{store.port} ...", flush=True)
    if ready is not None:
        ready.set()
    stop.wait()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m megatron_tinyllama.elastic store --port 29400``."""
    parser = argparse.ArgumentParser(description="Elastic runs under torchrun (see the README).")
    commands = parser.add_subparsers(dest="command", required=True)
    store = commands.add_parser("store", help="serve the c10d rendezvous store outside the nodes")
    store.add_argument("--port", type=int, default=29400)
    store.add_argument("--host", default="0.0.0.0", help="the interface to listen on")
    args = parser.parse_args(argv)
    try:
        serve_store(args.port, args.host)
    except (RuntimeError, OSError) as err:  # the port is taken, most often
        print(f"error: cannot serve the rendezvous store on {args.host}:{args.port}: {err}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
