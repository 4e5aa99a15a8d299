"""Goodput of an elastic run under faults (issue 31 item 3): what share of the wall time trains.

Two simulated nodes of two CPU ranks each run the tiny recipe of ``tests/integration/
test_elastic.py`` (the ``tinyllama-debug`` preset at vocabulary 1024 on the demo corpus's prose,
fp32, a global batch of 16 x 64 tokens) under torchrun's elastic agent, with the rendezvous store
served outside the nodes (:func:`megatron_tinyllama.elastic.serve_store`, a thread of this
process) and the README's settings (``--rdzv-conf``, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``,
``--max-restarts=100 --shutdown-timeout=120``). Nobody intervenes: a fault every 2-3 minutes
(``--fault-interval-s``), drawn with ``--seed`` from

* ``kill_node``: every process of one node killed at once (SIGKILL of its agent and ranks); the
  node comes back (the same torchrun line) a minute later (``--back-after-s``);
* ``sigstop_rank``: one rank stopped (SIGSTOP) and never continued: the stall watchdog
  (``train.stall_timeout_minutes``) must see it and the agent kill it;
* ``sigterm_agent``: SIGTERM to one node's agent, as a scheduler pre-empts a node: its ranks save
  and exit, and a replacement node comes back a minute later;
* ``lose_node``: one node killed and never back (drawn at most once, and always last: the job has
  no second node to lose after it).

With four or more faults every kind occurs at least once (``--kinds`` narrows the draw). Four runs
of the same recipe, one after the other: a short calibration (to size the run to ``--minutes`` of
wall time; ``--steps`` skips it), a fault-free run of the full length on both nodes (its mean time
per step is the fault-free step time; its final weights the reference), the run with faults, and a
fault-free run on one node (``--no-control`` skips it): how far the summation order of another
world alone moves the final weights. Then

    goodput = fault-free step time x steps kept / wall time of the run with faults

(steps kept: the run's steps, each counted once however often it was trained) and, since the two
runs may see different loads on a shared machine, ``productive_time_share``: the time the steps
kept took in the run with faults (each at the world it ran on) over its wall time. Per fault its
kind, when it was seen (at once for a kill or SIGTERM; for SIGSTOP the stall timeout after it, the
earliest a rank can tell a stopped peer from a slow one), the restarts it caused (the survivors',
and the returning node's), the time from the fault and from its being seen to the first step after
each, and the steps redone. Times are read from ``metrics.jsonl`` as it is written (polled every
0.1 s). The goals: the run reaches its last step with exit 0; goodput >= 0.75; every restart
within 60 s of its fault being seen; the final weights equal the fault-free run's within 1e-5.

Not a test; it takes ``--minutes`` plus the fault-free run (about as long again)::

    nice -n 5 python benchmarks/bench_goodput.py --minutes 15 --out benchmarks/results/goodput_cpu.json
    python benchmarks/bench_goodput.py --minutes 3          # a smoke run
    python benchmarks/bench_goodput.py --minutes 3 --kinds sigstop_rank --stop-rank 0 --no-control
"""

from __future__ import annotations

import argparse
import json
import re
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import yaml  # noqa: E402

from megatron_tinyllama.elastic import serve_store  # noqa: E402
from megatron_tinyllama.launch import free_port, launcher_env  # noqa: E402

KINDS = ("kill_node", "sigstop_rank", "sigterm_agent", "lose_node")
RECOVERABLE = KINDS[:3]
RDZV_CONF = "last_call_timeout=5,keep_alive_interval=2,keep_alive_max_attempt=3"  # the README's
RANKS_PER_NODE = 2
NODES = 2
GLOBAL_BATCH_TOKENS = 1024
EXPECTED_GOODPUT = 0.8
"""Only to size the run: steps = minutes x 60 x this / calibrated step time."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_recipe(work: Path, corpus, name: str, steps: int, args) -> Path:
    recipe = {
        "name": name,
        "model": {"preset": "tinyllama-debug", "vocab_size": 1024},
        "data": {"blend": f"1.0 {corpus.text_prefix}"},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_tokens": 20 * GLOBAL_BATCH_TOKENS},
        "train": {"train_tokens": steps * GLOBAL_BATCH_TOKENS, "global_batch_tokens": GLOBAL_BATCH_TOKENS,
                  "micro_batch_size": 4, "precision": "fp32",
                  "stall_timeout_minutes": args.stall_timeout_minutes},
        "checkpoint": {"save_dir": str(work / name), "save_interval_steps": args.save_interval_steps,
                       "keep_last": 2},
        "logging": {"log_interval_steps": 1},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


class MetricsTail:
    """Every line of a run's ``metrics.jsonl`` with the time it first appeared (seconds since
    ``t0``): the file is rewritten atomically at each resume, so lines are keyed by content (a
    step's record carries its measured tokens/s, so a redone step's line differs)."""

    def __init__(self, path: Path, t0: float, poll_s: float = 0.1) -> None:
        self.path, self.t0, self.poll_s = path, t0, poll_s
        self.seen: dict[str, float] = {}
        self.timeline: list[tuple[float, dict]] = []
        self.lines: list[str] = []
        """The raw line of each timeline entry."""
        self._inode: Optional[int] = None
        self._offset = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "MetricsTail":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._poll()

    def _poll(self) -> None:
        # Only what was appended since the last poll: a whole read of a file of thousands of lines
        # ten times a second would take CPU from the ranks. A resume replaces the file (another
        # inode, or shorter): then it is read again from the start.
        try:
            with open(self.path, "rb") as handle:
                inode = os.fstat(handle.fileno()).st_ino
                if (inode, True) != (self._inode, os.fstat(handle.fileno()).st_size >= self._offset):
                    self._inode, self._offset = inode, 0
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return
        complete = data[:data.rfind(b"\n") + 1]
        self._offset += len(complete)
        now = time.monotonic() - self.t0
        with self._lock:
            for line in complete.decode(errors="replace").splitlines():
                if line in self.seen or not line.endswith("}"):
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                self.seen[line] = now
                self.timeline.append((now, record))
                self.lines.append(line)

    def snapshot(self) -> list[tuple[float, dict]]:
        with self._lock:
            return list(self.timeline)

    def kept_step_durations(self) -> dict[int, tuple[float, int]]:
        """Per step of the final ``metrics.jsonl`` (each step once, its last training): (seconds it
        took, world size it ran at). A step's time is the gap to the step logged before it in the
        same start (no world or resume event between); the first step of a start, which has none,
        gets its start's median."""
        with self._lock:
            entries = list(zip(self.timeline, self.lines))
        duration: dict[str, Optional[float]] = {}
        world_of: dict[str, int] = {}
        previous: Optional[float] = None
        world, start_lines, starts = 0, [], []
        for (t, record), line in entries:
            if record.get("event") in ("world", "resume", "restart"):
                previous = None
                if record.get("event") == "world":
                    world = record["world_size"]
                starts.append(start_lines)
                start_lines = []
            elif "train_loss" in record:
                duration[line] = None if previous is None else t - previous
                world_of[line] = world
                start_lines.append(line)
                previous = t
        starts.append(start_lines)
        known = [d for d in duration.values() if d is not None]
        overall = statistics.median(known) if known else 0.0
        for lines in starts:
            mine = [duration[line] for line in lines if duration[line] is not None]
            for line in lines:
                if duration[line] is None:
                    duration[line] = statistics.median(mine) if mine else overall
        kept: dict[int, tuple[float, int]] = {}
        for line in self.path.read_text().splitlines():
            if line in duration:
                kept[json.loads(line)["step"]] = (duration[line], world_of[line])
        return kept

    def last_step(self) -> int:
        return max((r["step"] for _, r in self.snapshot() if "train_loss" in r), default=0)


@dataclass
class Node:
    name: str
    agent: subprocess.Popen
    log: Path
    started_at: float
    gone: bool = False
    """Killed, pre-empted or lost (a returning node is a new Node)."""


@dataclass
class Fault:
    kind: str
    at: float
    node: str
    rank: Optional[int] = None
    seen_at: float = 0.0
    back_at: Optional[float] = None
    last_step_before: int = 0
    notes: list[str] = field(default_factory=list)


class Cluster:
    """Agents (simulated nodes) of one run; each node's whole process tree can be killed."""

    def __init__(self, recipe: Path, endpoint: str, run_id: str, logs: Path, env: dict, t0: float) -> None:
        self.recipe, self.endpoint, self.run_id, self.logs, self.env, self.t0 = \
            recipe, endpoint, run_id, logs, env, t0
        self.nodes: list[Node] = []
        self._starts: dict[str, int] = {}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start_node(self, name: str) -> Node:
        self._starts[name] = self._starts.get(name, 0) + 1
        log_path = self.logs / f"{self.run_id}.{name}.{self._starts[name]}.log"
        cmd = ["torchrun", f"--nnodes=1:{NODES}", f"--nproc-per-node={RANKS_PER_NODE}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}", f"--rdzv-id={self.run_id}",
               "--max-restarts=100", "--shutdown-timeout=120", f"--rdzv-conf={RDZV_CONF}",
               "-m", "megatron_tinyllama.train.pretrain", "--config", str(self.recipe)]
        with open(log_path, "w") as out:
            agent = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=REPO)
        node = Node(name, agent, log_path, self.now())
        self.nodes.append(node)
        return node

    def live(self) -> list[Node]:
        return [n for n in self.nodes if not n.gone and n.agent.poll() is None]

    @staticmethod
    def ranks_of(node: Node) -> list[psutil.Process]:
        try:
            return [p for p in psutil.Process(node.agent.pid).children()
                    if "megatron_tinyllama.train.pretrain" in " ".join(p.cmdline())]
        except psutil.Error:
            return []

    @staticmethod
    def kill_tree(node: Node) -> None:
        """A node lost: its agent and every process under it, at once."""
        try:
            root = psutil.Process(node.agent.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            processes = []
        for process in processes:
            try:
                process.kill()
            except psutil.Error:
                pass
        node.gone = True
        node.agent.wait()

    def kill_all(self) -> None:
        for node in self.nodes:
            if node.agent.poll() is None:
                self.kill_tree(node)


def plan_faults(rng: random.Random, minutes: float, interval: tuple[float, float],
                kinds_allowed: tuple[str, ...] = KINDS) -> list[tuple[float, str]]:
    """(time in seconds, kind) of each fault, drawn with ``rng`` from ``kinds_allowed``."""
    times, t = [], 0.0
    while True:
        t += rng.uniform(*interval)
        if t > minutes * 60 - 60:  # a fault in the last minute would find the run ended
            break
        times.append(t)
    n = len(times)
    recoverable = [k for k in RECOVERABLE if k in kinds_allowed]
    if kinds_allowed == ("lose_node",):
        kinds = ["lose_node"][:n]
    elif n >= len(kinds_allowed):
        kinds = recoverable + [rng.choice(recoverable) for _ in range(n - len(kinds_allowed))]
        rng.shuffle(kinds)
        if "lose_node" in kinds_allowed:
            kinds.append("lose_node")
    else:
        kinds = rng.sample(kinds_allowed, n)
        if "lose_node" in kinds:
            kinds.remove("lose_node")
            kinds.append("lose_node")
    return list(zip(times, kinds))


SETTLE_S = 30.0
"""A fault waits until the world has trained this long since it formed."""


def healthy(cluster: Cluster, tail: MetricsTail, lost_for_good: int, since: float) -> bool:
    """Every node that should be there trains: a world formed after ``since`` (the last fault)
    has them all, and has trained for :data:`SETTLE_S`."""
    timeline = tail.snapshot()
    worlds = [(t, r) for t, r in timeline if r.get("event") == "world" and t > since]
    if not worlds or len(cluster.live()) != NODES - lost_for_good:
        return False
    t_world, world = worlds[-1]
    first = next((t for t, r in timeline if t > t_world and "train_loss" in r), None)
    return (world["world_size"] == RANKS_PER_NODE * (NODES - lost_for_good)
            and first is not None and cluster.now() - first >= SETTLE_S)


def inject(kind: str, cluster: Cluster, tail: MetricsTail, rng: random.Random, args) -> Fault:
    live = cluster.live()
    node = rng.choice(live)
    fault = Fault(kind, cluster.now(), node.name, last_step_before=tail.last_step())
    if kind == "sigstop_rank":
        ranks = cluster.ranks_of(node)
        victim = rng.choice(ranks)
        if args.stop_rank is not None:  # the rank asked for, wherever it is
            victim = next((p for n in live for p in cluster.ranks_of(n)
                           if int(p.environ().get("RANK", -1)) == args.stop_rank), victim)
        fault.rank = int(victim.environ().get("RANK", -1))
        victim.suspend()  # SIGSTOP, never continued
        fault.seen_at = fault.at + 60 * args.stall_timeout_minutes
        fault.notes.append(f"pid {victim.pid} stopped")
    elif kind == "sigterm_agent":
        os.kill(node.agent.pid, signal.SIGTERM)
        node.gone = True
        fault.seen_at = fault.at
    else:  # kill_node, lose_node
        cluster.kill_tree(node)
        fault.seen_at = fault.at
    log(f"fault {kind} on {node.name}" + (f" rank {fault.rank}" if fault.rank is not None else "")
        + f" at {fault.at:.1f} s, last step logged {fault.last_step_before}")
    return fault


def run_job(name: str, recipe: Path, steps: int, work: Path, endpoint: str, env: dict, args,
            faults: Optional[list[tuple[float, str]]] = None, rng: Optional[random.Random] = None,
            nodes: int = NODES) -> dict:
    """One run to its end (every agent exited); faults injected on schedule. Returns its record."""
    t0, t0_wall = time.monotonic(), time.time()
    save_dir = work / name
    tail = MetricsTail(save_dir / "metrics.jsonl", t0).start()
    cluster = Cluster(recipe, endpoint, name, work / "logs", env, t0)
    for i in range(nodes):
        cluster.start_node(f"node{i}")
    done: list[Fault] = []
    pending = list(faults or [])
    returns: list[tuple[float, str, Fault]] = []  # (when, node name, its fault)
    lost_for_good = 0
    deadline = args.minutes * 60 * 3 + 600
    try:
        while cluster.now() < deadline:
            now = cluster.now()
            finished = tail.last_step() >= steps
            for back in [r for r in returns if r[0] <= now]:
                returns.remove(back)
                old = next(n for n in cluster.nodes if n.name == back[1] and n.gone)
                if old.agent.poll() is None:  # a pre-empted agent still saving: let it end first
                    returns.append((now + 1, back[1], back[2]))
                    continue
                if finished:
                    back[2].notes.append("not brought back: the run had ended")
                    continue
                cluster.start_node(back[1])
                back[2].back_at = now
                log(f"{back[1]} back at {now:.1f} s")
            if pending and pending[0][0] <= now and not finished:
                if healthy(cluster, tail, lost_for_good, done[-1].at if done else -1.0):
                    planned, kind = pending.pop(0)
                    fault = inject(kind, cluster, tail, rng, args)
                    fault.notes.append(f"planned at {planned:.1f} s")
                    done.append(fault)
                    if kind in ("kill_node", "sigterm_agent"):
                        returns.append((fault.at + args.back_after_s, fault.node, fault))
                    lost_for_good += kind == "lose_node"
            if not cluster.live() and not returns:
                break
            time.sleep(0.1)
        else:
            log(f"{name}: not ended after {deadline:.0f} s; killing it")
    finally:
        cluster.kill_all()
        tail.stop()
    wall = cluster.now()
    timeline = tail.snapshot()
    record = {
        "wall_s": wall,
        "agents": [{"node": n.name, "started_at_s": round(n.started_at, 1), "exit": n.agent.returncode,
                    "faulted": n.gone, "log": str(n.log)} for n in cluster.nodes],
        "steps_logged": sorted(json.loads(line)["step"] for line in
                               (save_dir / "metrics.jsonl").read_text().splitlines() if '"train_loss"' in line),
        "kept": tail.kept_step_durations(),
        "timeline": timeline,
        "agent_events": agent_events([n.log for n in cluster.nodes], t0_wall),
        "losses": {json.loads(line)["step"]: json.loads(line)["train_loss"] for line in
                   (save_dir / "metrics.jsonl").read_text().splitlines() if '"train_loss"' in line},
        "faults": done,
        "save_dir": str(save_dir),
    }
    log(f"{name}: ended after {wall:.1f} s; agents exit {[a['exit'] for a in record['agents']]}")
    return record


AGENT_LINE = re.compile(r"^[IWE](\d\d)(\d\d) (\d\d:\d\d:\d\d\.\d+) +\d+ .*?\] (.*)$")
AGENT_EVENTS = {"Rendezvous'ing worker group": "rendezvous_start",
                "Rendezvous complete for workers": "rendezvous_done",
                "Starting worker group": "workers_start",
                "failed (exitcode": "rank_failed",
                "Stopping worker group": "stopping",
                "Unable to shutdown process": "rank_killed_after_30_s"}


def agent_events(logs: list[Path], t0_wall: float) -> list[tuple[float, str, str]]:
    """(seconds since the run began, event, agent log) of what torchrun's agents logged
    (``LOGLEVEL=INFO``): rendezvous rounds, worker starts and failures."""
    import datetime

    year = datetime.date.today().year
    events = []
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            match = AGENT_LINE.match(line)
            if not match:
                continue
            kind = next((v for k, v in AGENT_EVENTS.items() if k in match.group(4)), None)
            if kind is None:
                continue
            when = datetime.datetime.strptime(f"{year}{match.group(1)}{match.group(2)} {match.group(3)}",
                                              "%Y%m%d %H:%M:%S.%f").timestamp()
            events.append((round(when - t0_wall, 2), kind, path.name))
    return sorted(events)


def step_times(timeline: list[tuple[float, dict]]) -> dict[int, float]:
    """When each step of the final metrics first appeared (its last training)."""
    seen: dict[int, float] = {}
    for t, r in timeline:
        if "train_loss" in r:
            seen[r["step"]] = t  # a redone step: its last time
    return seen


def fault_free_step_time(timeline) -> float:
    times = step_times(timeline)
    first, last = min(times), max(times)
    return (times[last] - times[first]) / (last - first)


def analyse_faults(run: dict, stall_s: float) -> list[dict]:
    """Per fault: the restarts it caused (world events until the next fault), their times, redone steps."""
    timeline = run["timeline"]
    faults: list[Fault] = run["faults"]
    out = []
    for i, fault in enumerate(faults):
        end = faults[i + 1].at if i + 1 < len(faults) else float("inf")
        restarts = []
        worlds = [(t, r) for t, r in timeline if r.get("event") == "world" and fault.at < t < end]
        for j, (t_world, world) in enumerate(worlds):
            first = next((t for t, r in timeline if t > t_world and "train_loss" in r), None)
            is_return = bool(world.get("joined"))
            seen = fault.back_at if is_return and fault.back_at is not None else fault.seen_at
            redone = (world["last_step"] - world["step"]) if world.get("last_step") is not None else 0
            since = fault.back_at if is_return and fault.back_at is not None else fault.at
            where = breakdown(run["agent_events"], since, seen, t_world, first)
            restarts.append({
                "world": f"{world['previous_world_size']} -> {world['world_size']}",
                "message": world.get("message"),
                "cause": "node back" if is_return else "fault",
                "seen_at_s": round(seen, 1),
                "world_event_at_s": round(t_world, 1),
                "first_step_at_s": round(first, 1) if first is not None else None,
                "restart_after_seen_s": round(first - seen, 1) if first is not None else None,
                "resumed_step": world["step"], "last_step_before": world.get("last_step"),
                "steps_redone": redone,
                "where_the_time_went_s": where,
            })
        first_new = restarts[0]["first_step_at_s"] if restarts else None
        regained = next((t for t, r in timeline if t > fault.at and "train_loss" in r
                         and r["step"] > fault.last_step_before and restarts
                         and t >= restarts[0]["world_event_at_s"]), None)
        out.append({
            "kind": fault.kind, "node": fault.node, "rank": fault.rank,
            "at_s": round(fault.at, 1), "seen_at_s": round(fault.seen_at, 1),
            "seen_how": (f"the stall timeout ({stall_s:.0f} s) after the SIGSTOP" if fault.kind == "sigstop_rank"
                         else "at once"),
            "back_at_s": round(fault.back_at, 1) if fault.back_at is not None else None,
            "last_step_before": fault.last_step_before,
            "fault_to_first_new_step_s": round(first_new - fault.at, 1) if first_new is not None else None,
            "fault_to_progress_regained_s": round(regained - fault.at, 1) if regained is not None else None,
            "steps_redone": sum(r["steps_redone"] for r in restarts),
            "restarts": restarts,
            "notes": fault.notes,
        })
    return out


def breakdown(events: list, since: float, seen: float, t_world: float, first: Optional[float]) -> dict:
    """A restart's time from its fault being seen to its first step, by phase, from the agents' log:
    until the first rank ends (``detect``: for a stopped rank the stall report), until the last
    agent is in the rendezvous (``agents_stop``: an agent stops its ranks, SIGKILL 30 s after a
    SIGTERM that a stopped rank cannot act on), the rendezvous, and the new ranks' start (imports,
    engine, checkpoint load) to the first step."""
    window = [(t, kind) for t, kind, _ in events if since - 0.5 <= t <= t_world]
    ended = next((t for t, kind in window if kind in ("rank_failed", "stopping")), None)
    done = max((t for t, kind in window if kind == "rendezvous_done"), default=None)
    entered = max((t for t, kind in window if kind == "rendezvous_start" and done is not None and t <= done),
                  default=None)
    if None in (ended, done, entered, first):
        return {}
    return {"detect": round(ended - seen, 1), "agents_stop": round(entered - ended, 1),
            "rendezvous": round(done - entered, 1), "ranks_start_to_first_step": round(first - done, 1),
            "rank_killed_after_30_s": any(kind == "rank_killed_after_30_s" for _, kind in window)}


def final_weights_diff(a: Path, b: Path) -> dict:
    from megatron_tinyllama.checkpoint.per_rank import load_model_checkpoint

    _, shards_a = load_model_checkpoint(a)
    _, shards_b = load_model_checkpoint(b)
    worst, name = 0.0, None
    for shard_a, shard_b in zip(shards_a, shards_b):
        if set(shard_a) != set(shard_b):
            raise SystemExit(f"{a} and {b} hold other parameters: {sorted(set(shard_a) ^ set(shard_b))}")
        for key, tensor in shard_a.items():
            diff = float((tensor.float() - shard_b[key].float()).abs().max())
            if diff >= worst:
                worst, name = diff, key
    return {"max_abs_diff": worst, "parameter": name, "tensors": sum(len(s) for s in shards_a)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="wall time of the run with faults (about)")
    parser.add_argument("--seed", type=int, default=0, help="draws the faults, their times and targets")
    parser.add_argument("--fault-interval-s", default=None,
                        help="MIN:MAX seconds between faults (default 120:180; 40:50 for a smoke run "
                             "of under 10 minutes, so that it sees more than one fault)")
    parser.add_argument("--back-after-s", type=float, default=60.0,
                        help="a killed or pre-empted node comes back this long after the fault")
    parser.add_argument("--stall-timeout-minutes", type=float, default=0.25,
                        help="train.stall_timeout_minutes: how soon a stopped rank is seen")
    parser.add_argument("--save-interval-steps", type=int, default=10, help="checkpoint.save_interval_steps")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"the fault kinds to draw from (default all: {','.join(KINDS)})")
    parser.add_argument("--stop-rank", type=int, default=None,
                        help="sigstop_rank stops this global rank (default: one drawn); 0 hosts the "
                             "ranks' store, the slowest case")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the fault-free one-node run (the weights' noise floor)")
    parser.add_argument("--steps", type=int, default=None, help="skip the calibration: this many steps")
    parser.add_argument("--work-dir", default=None, help="corpus, runs and logs (default: a new temp dir)")
    parser.add_argument("--out", default=None, help="write the JSON here (benchmarks/results/goodput_cpu.json)")
    args = parser.parse_args(argv)
    if args.fault_interval_s is None:
        args.fault_interval_s = "120:180" if args.minutes >= 10 else "40:50"
    interval = tuple(float(x) for x in args.fault_interval_s.split(":"))
    unknown = set(args.kinds.split(",")) - set(KINDS)
    if unknown:
        parser.error(f"--kinds: unknown {sorted(unknown)}; known: {','.join(KINDS)}")
    if len(interval) != 2 or not 0 < interval[0] <= interval[1]:
        parser.error(f"--fault-interval-s {args.fault_interval_s!r}: expected MIN:MAX seconds, 0 < MIN <= MAX")

    from megatron_tinyllama.data.demo_corpus import build_demo_corpus

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="goodput-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    log(f"work dir {work}; load average {os.getloadavg()}")
    corpus = build_demo_corpus(work / "corpus", vocab_size=1024, max_code_bytes=400_000)
    # LOGLEVEL=INFO: the agents log their rendezvous rounds and worker exits with timestamps.
    env = {**launcher_env(), "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "LOGLEVEL": "INFO"}
    port = free_port()
    ready, stop = threading.Event(), threading.Event()
    threading.Thread(target=serve_store, args=(port, "127.0.0.1", ready, stop), daemon=True).start()
    if not ready.wait(30):
        raise SystemExit("the rendezvous store did not start")
    endpoint = f"127.0.0.1:{port}"
    stall_s = 60 * args.stall_timeout_minutes
    load_before = os.getloadavg()
    try:
        calibration = None
        steps = args.steps
        if steps is None:
            cal_steps = 30
            recipe = write_recipe(work, corpus, "calibration", cal_steps, args)
            cal = run_job("calibration", recipe, cal_steps, work, endpoint, env, args)
            calibration = fault_free_step_time(cal["timeline"])
            steps = max(50, int(args.minutes * 60 * EXPECTED_GOODPUT / calibration))
            log(f"calibration: {calibration:.3f} s per step -> {steps} steps")
        recipe = write_recipe(work, corpus, "fault_free", steps, args)
        reference = run_job("fault_free", recipe, steps, work, endpoint, env, args)
        t_step = fault_free_step_time(reference["timeline"])
        log(f"fault-free: {t_step:.3f} s per step, {reference['wall_s']:.1f} s wall")

        rng = random.Random(args.seed)
        faults = plan_faults(rng, args.minutes, interval, tuple(args.kinds.split(",")))
        log(f"faults planned: {[(round(t), k) for t, k in faults]}")
        recipe = write_recipe(work, corpus, "faults", steps, args)
        run = run_job("faults", recipe, steps, work, endpoint, env, args, faults, rng)
        control = None
        if not args.no_control:
            # The noise floor of the weights' comparison: the same recipe without faults on one
            # node (DP 2 instead of 4: only the order in which gradients are summed differs).
            recipe = write_recipe(work, corpus, "one_node", steps, args)
            control = run_job("one_node", recipe, steps, work, endpoint, env, args, nodes=1)
    finally:
        stop.set()
    load_after = os.getloadavg()

    per_fault = analyse_faults(run, stall_s)
    restarts = [r for f in per_fault for r in f["restarts"]]
    final_agents = [a for a in run["agents"] if not a["faulted"]]
    reached = run["steps_logged"] == list(range(1, steps + 1))
    exit0 = bool(final_agents) and all(a["exit"] == 0 for a in final_agents)
    goodput = t_step * steps / run["wall_s"]
    # The share of the wall time spent on the steps kept, at whatever speed their world ran: what
    # restarts, detection and redone steps cost, apart from the world's size (see the docstring).
    productive_s = sum(d for d, _ in run["kept"].values())
    goodput_time = productive_s / run["wall_s"]
    by_world: dict[int, list[float]] = {}
    for d, w in run["kept"].values():
        by_world.setdefault(w, []).append(d)
    ff_goodput = t_step * steps / reference["wall_s"]
    from megatron_tinyllama.checkpoint.training import step_tag

    final = Path(reference["save_dir"]) / step_tag(steps)
    weights = final_weights_diff(final, Path(run["save_dir"]) / step_tag(steps)) if reached else None
    if weights is not None:
        weights["max_abs_train_loss_diff"] = max(abs(run["losses"][k] - v) for k, v in reference["losses"].items())
    floor = None
    if control is not None and control["steps_logged"] == list(range(1, steps + 1)):
        floor = final_weights_diff(final, Path(control["save_dir"]) / step_tag(steps))
        floor["max_abs_train_loss_diff"] = max(abs(control["losses"][k] - v)
                                               for k, v in reference["losses"].items())
        floor["wall_s"] = round(control["wall_s"], 1)
    worst_restart = max((r["restart_after_seen_s"] for r in restarts
                         if r["restart_after_seen_s"] is not None), default=None)
    goals = {
        "last_step_exit_0": {"met": reached and exit0, "steps_logged_once_each": reached,
                             "final_agents_exit": [a["exit"] for a in final_agents]},
        "goodput_at_least_0.75": {"met": goodput >= 0.75 and goodput_time >= 0.75,
                                  "goodput": round(goodput, 3),
                                  "productive_time_share": round(goodput_time, 3)},
        "restart_within_60_s_of_seen": {
            "met": bool(restarts) and all(r["restart_after_seen_s"] is not None
                                          and r["restart_after_seen_s"] <= 60 for r in restarts),
            "worst_s": worst_restart},
        "final_weights_within_1e-5": {"met": weights is not None and weights["max_abs_diff"] <= 1e-5,
                                      **(weights or {}),
                                      "one_node_fault_free_against_two_node_fault_free": floor},
    }
    result = {
        "benchmark": "bench_goodput",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPU cores, shared (load average {load_before[0]:.1f} before, "
                   f"{load_after[0]:.1f} after)",
        "setup": {"nodes": NODES, "ranks_per_node": RANKS_PER_NODE, "preset": "tinyllama-debug (vocab 1024)",
                  "precision": "fp32", "global_batch": "16 x 64 tokens", "steps": steps,
                  "save_interval_steps": args.save_interval_steps,
                  "stall_timeout_minutes": args.stall_timeout_minutes, "rdzv_conf": RDZV_CONF,
                  "torchrun": "--max-restarts=100 --shutdown-timeout=120, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
                  "minutes": args.minutes, "seed": args.seed, "fault_interval_s": list(interval),
                  "back_after_s": args.back_after_s},
        "calibration_step_s": calibration,
        "fault_free": {"step_s": round(t_step, 4), "wall_s": round(reference["wall_s"], 1),
                       "goodput_same_formula": round(ff_goodput, 3),
                       "agents_exit": [a["exit"] for a in reference["agents"]]},
        "faults_run": {"wall_s": round(run["wall_s"], 1), "steps_kept": steps,
                       "steps_redone": sum(f["steps_redone"] for f in per_fault),
                       "productive_s": round(productive_s, 1),
                       "median_step_s_by_world_size": {w: round(statistics.median(d), 4)
                                                       for w, d in sorted(by_world.items())},
                       "steps_by_world_size": {w: len(d) for w, d in sorted(by_world.items())},
                       "agents": run["agents"]},
        "goodput": round(goodput, 3),
        "productive_time_share": round(goodput_time, 3),
        "goals": goals,
        "faults": per_fault,
        "work_dir": str(work),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if all(g["met"] for g in goals.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
