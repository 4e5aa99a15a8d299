"""This module owns noticing, from inside a rank, that the job can no longer go on as it should.

* :class:`LauncherWatch`: the ``deepspeed`` launcher that started this rank is gone. A cluster's
  scheduler signals the launcher's PID, not the ranks; the runner (``deepspeed``, deepspeed's
  ``launcher/runner.py``) installs no handler when it runs this node itself (no pdsh), so SIGTERM
  ends it at once (143) and SIGINT with a KeyboardInterrupt (130), while its child
  ``deepspeed.launcher.launch`` (which would pass a SIGTERM on to the ranks) and the ranks under
  it carry on as orphans. So each rank watches its parent (``launch``) and the parent's parent
  (the runner) and, when either is gone, asks the run to stop as SIGTERM to a rank does: finish
  the step, save, exit 3. ``PR_SET_PDEATHSIG`` would not do: it fires when the *parent* dies,
  and here the parent survives its own parent. ``tinyllama-pipeline`` above the runner (a stage
  run on this machine) is watched the same way.
* :class:`StallWatchdog`: no progress (a step, an evaluation, a save) within
  ``train.stall_timeout_minutes``. A rank blocked in a collective cannot act in its main thread,
  so a thread in every rank watches the time since the last progress and publishes a heartbeat in
  the job's rendezvous store (a client of its own, with a short timeout): its step, where its main
  thread is, and from PyTorch's flight recorder the collectives it entered and finished in every
  process group. When the time is up one rank reads every heartbeat in a batched store call and
  names the ranks whose heartbeat stopped (a stopped or hung process) and those the others wait
  for (alive, but not in the collective the others are in: a rank stuck in a save, in data loading
  or in D state on a file system); every rank writes its flight-recorder dump and ends with
  :data:`EXIT_STALLED`; the launcher then stops the others. The process groups' timeout follows
  the stall timeout, so a collective stuck where no Python thread runs ends the rank too.
  The last complete checkpoint is untouched: a stall never leaves a save half-counted, because a
  checkpoint counts only once its ``trainer_state.json`` is written.
* A peer gone mid-collective (its node lost, its processes killed): the collective raises
  ("Connection closed by peer"); leaving :class:`StallWatchdog`'s block with that error, the rank
  names the lost ranks and their node and host from the heartbeats that stopped, and ends with
  :data:`EXIT_PEER_LOST` instead of gloo's traceback.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pickle
import re
import socket
import sys
import threading
import time
from typing import Callable, Optional

logger = logging.getLogger(__name__)

EXIT_STALLED = 4
"""Exit status of a rank that saw no progress for ``train.stall_timeout_minutes``."""

EXIT_PEER_LOST = 5
"""Exit status of a rank whose peer is gone mid-collective (its node lost, its processes killed)."""

# What gloo and NCCL say when the other end of a collective is gone.
_PEER_LOST_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                      "ncclRemoteError", "NCCL communicator was aborted", "Connection refused")

_POLL_S = 1.0


def is_peer_lost(error: BaseException) -> bool:
    """True for the error a collective raises when a peer's process is gone."""
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _PEER_LOST_MARKERS)


def _is_deepspeed_launch(cmdline: list[str]) -> bool:
    return any("deepspeed.launcher.launch" in arg for arg in cmdline[:4])


def _is_deepspeed_runner(cmdline: list[str]) -> bool:
    return any(os.path.basename(arg) in ("deepspeed", "ds") or "deepspeed.launcher.runner" in arg
               for arg in cmdline[:3])


def _is_torchrun_agent(cmdline: list[str]) -> bool:
    return any(os.path.basename(arg) == "torchrun" or arg in ("torch.distributed.run", "torch.distributed.launch")
               for arg in cmdline[:3])


def _is_pipeline(cmdline: list[str]) -> bool:
    return any(os.path.basename(arg) == "tinyllama-pipeline" or arg == "megatron_tinyllama.pipeline"
               for arg in cmdline[:3])


def _where(step: int, what: str) -> str:
    return f"step {step}" if what == "step" else f"{what} at step {step}"


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


def _hard_exit(code: int) -> None:
    """Flush what was logged and end the process now (its main thread may be blocked)."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class LauncherWatch:
    """Watch this rank's deepspeed launcher processes from a daemon thread.

    ``reason`` becomes a sentence once one is gone; :class:`~megatron_tinyllama.train.loop.
    StopRequest` reads it as it reads a signal. If the rank has not ended ``grace_s`` later (it was
    blocked before its first step, or in a collective with a peer that is gone), it exits 1.

    Args:
        grace_s: None to wait for the rank however long it takes.
        processes: (process, name) pairs to watch instead of the launcher's (tests).
    """

    def __init__(self, grace_s: Optional[float] = None, processes: Optional[list] = None,
                 poll_s: float = _POLL_S) -> None:
        self.reason: Optional[str] = None
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.watched = self.launcher_processes() if processes is None else processes
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def launcher_processes() -> list:
        """deepspeed's per-node ``launch`` (this rank's parent), the ``deepspeed`` runner above it
        and ``tinyllama-pipeline`` above that (a stage run on this machine), or torchrun's agent,
        as (``psutil.Process``, name); [] when this rank was not started by them.

        The pipeline counts as a launcher: SIGKILL of its PID alone (not its process group)
        leaves the stage's runner alive, so the ranks would train on to the end of the stage."""
        import psutil

        found: list = []
        try:
            parent = psutil.Process(os.getppid())
            if _is_torchrun_agent(parent.cmdline()):
                # torchrun starts its ranks in sessions of their own: SIGKILL of the agent alone
                # leaves them training, and its peers' agents wait for it at their exit barrier.
                return [(parent, "torchrun's elastic agent")]
            if not _is_deepspeed_launch(parent.cmdline()):
                return []
            found.append((parent, "deepspeed's per-node launcher (deepspeed.launcher.launch)"))
            runner = parent.parent()
            if runner is not None and _is_deepspeed_runner(runner.cmdline()):
                found.append((runner, "the deepspeed launcher"))
                pipeline = runner.parent()
                if pipeline is not None and _is_pipeline(pipeline.cmdline()):
                    found.append((pipeline, "tinyllama-pipeline"))
        except psutil.Error:  # one above has gone meanwhile: watch what was found
            pass
        return found

    def start(self) -> "LauncherWatch":
        if self.watched:
            self._thread = threading.Thread(target=self._run, name="launcher-watch", daemon=True)
            self._thread.start()
        return self

    @staticmethod
    def _gone(process) -> bool:
        import psutil

        try:  # a killed runner stays a zombie until its own parent reaps it
            return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def _run(self) -> None:
        while self.reason is None:
            for process, name in self.watched:
                if self._gone(process):
                    self.reason = f"{name} (pid {process.pid}) exited"
                    break
            else:
                time.sleep(self.poll_s)
        logger.warning("%s: stopping after this step with a checkpoint", self.reason)
        if self.grace_s is None:
            return
        time.sleep(self.grace_s)
        logger.error("%s %.0f s ago and this rank has not stopped (blocked before its first step or "
                     "waiting for a peer that is gone); exiting now, the last checkpoint is intact",
                     self.reason, self.grace_s)
        _hard_exit(1)


def collective_status() -> dict[str, list[int]]:
    """Per process group (PyTorch's flight-recorder id): [last collective this rank entered, last it
    finished], by sequence number; {} without a flight recorder. Cheap (no entries are copied)."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json

        status = json.loads(_dump_fr_trace_json(False, False)).get("pg_status", {})
        return {pg: [int(s["last_enqueued_collective"]), int(s["last_completed_collective"])]
                for pg, s in status.items()}
    except Exception:  # noqa: BLE001 (a PyTorch internal: the report does without it)
        return {}


def pending_collectives() -> list[dict]:
    """The collectives this rank entered and has not finished, from the flight recorder: per
    process group the oldest, as ``{"pg", "group", "seq", "op", "since"}``, oldest first."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace

        trace = pickle.loads(_dump_fr_trace(True, False, False))
    except Exception:  # noqa: BLE001
        return []
    finished = {str(pg): int(s["last_completed_collective"])
                for pg, s in (trace.get("pg_status") or {}).items()}
    oldest: dict[str, dict] = {}
    for entry in trace.get("entries", []):
        pg = str(entry.get("pg_id"))
        if (entry.get("retired") or entry.get("is_p2p") or entry.get("state") == "completed"
                or entry.get("collective_seq_id", 0) <= finished.get(pg, -1)):
            continue
        if pg not in oldest or entry["collective_seq_id"] < oldest[pg]["collective_seq_id"]:
            oldest[pg] = entry
    found = []
    for pg, entry in oldest.items():
        name, desc = (tuple(entry.get("process_group") or ()) + ("", ""))[:2]
        found.append({"pg": pg, "group": desc if desc not in ("", "undefined") else f"group {name or pg}",
                      "seq": entry["collective_seq_id"], "op": entry.get("profiling_name", "?"),
                      "since": entry.get("time_created_ns", 0) / 1e9})
    return sorted(found, key=lambda c: c["since"])


def _short(path: str) -> str:
    for marker in ("site-packages" + os.sep, os.getcwd() + os.sep):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def main_thread_at() -> str:
    """``file:line in function`` of the main thread's innermost Python frame (and of the innermost
    frame of this package, when that is another): where a rank that makes no progress is."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "unknown"
    where = [f"{_short(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"]
    ours = frame
    while ours is not None and f"{os.sep}megatron_tinyllama{os.sep}" not in ours.f_code.co_filename:
        ours = ours.f_back
    if ours is not None and ours is not frame:
        where.append(f"called from {_short(ours.f_code.co_filename)}:{ours.f_lineno} in "
                     f"{ours.f_code.co_name}")
    return ", ".join(where)


def _collective_text(beat: dict) -> str:
    pending = beat.get("pending")
    if pending:
        return "waiting in " + ", ".join(
            f"collective #{c['seq']} {c['op']} ({c['group']}) since {_clock(c['since'])}"
            for c in pending)
    status = beat.get("collectives") or {}
    if any(entered > finished for entered, finished in status.values()):
        return "in a collective"
    return "not in a collective" + (" (every one it entered has finished)" if status else "")


def _ranges(ranks) -> str:
    """``0-254, 256``: rank lists of any size in one short line."""
    ranks, spans = sorted(ranks), []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def holding_up(beats: dict[int, dict]) -> list[str]:
    """Which ranks the others wait for, from their heartbeats' flight-recorder status.

    For every process group in which some rank has entered a collective it has not finished, the
    ranks that have not entered it yet are the ones holding the job (alive or not): named with the
    collective and, when known, where their main thread is.
    """
    lines = []
    for pg in sorted({pg for beat in beats.values() for pg in (beat.get("collectives") or {})}):
        status = {rank: beat["collectives"][pg] for rank, beat in beats.items()
                  if pg in (beat.get("collectives") or {})}
        waiting = {rank: entered for rank, (entered, finished) in status.items() if entered > finished}
        if not waiting:
            continue
        seq = max(waiting.values())
        behind = sorted(rank for rank, (entered, _) in status.items() if entered < seq)
        if not behind:
            continue
        pending = next((c for r in waiting for c in beats[r].get("pending") or ()
                        if c["pg"] == pg and c["seq"] == seq), None)
        what = (f"collective #{seq} {pending['op']} ({pending['group']})" if pending
                else f"collective #{seq} of process group {pg}")
        for rank in behind:
            at = beats[rank].get("at")
            lines.append(f"holding up the job: rank {rank} has not entered {what} that rank"
                         f"{'s' if len(waiting) > 1 else ''} {_ranges(waiting)} "
                         f"wait{'' if len(waiting) > 1 else 's'} in (its last: #{status[rank][0]})"
                         + (f"; its main thread is at {at}" if at else ""))
    return lines


class StallWatchdog:
    """End the rank when no progress is reported for ``timeout_s``, naming who stalled.

    Use as a context manager around the training loop and call :meth:`progress` before each
    step, evaluation and save. The timer runs from the first :meth:`progress` call.

    Every rank's heartbeat carries its step, where its main thread is and, from PyTorch's flight
    recorder, the collectives it entered and finished per process group. When the time is up, one
    rank (``reporter``, rank 0, which also hosts the store) reads every heartbeat in one batched
    store call, twice, and names the ranks that stopped beating and those the others wait for in
    a collective; every other rank logs its own state and waits, with one store call, for that
    report, so a job of thousands of ranks does not make thousands of store calls at once. Every
    rank then writes its flight-recorder dump (see
    :func:`~megatron_tinyllama.parallel.init.flight_recorder_prefix`) and exits with
    :data:`EXIT_STALLED`.

    On entry it also sets every process group's timeout to the stall timeout plus the time the
    report takes (:attr:`collective_timeout_s`), so that a collective stuck where this thread
    cannot run ends the rank too (on NCCL with PyTorch's own dump) instead of the fixed 30 minutes.

    Args:
        timeout_s: seconds without progress before the rank exits with :data:`EXIT_STALLED`;
            None: no watchdog (:meth:`progress` costs nothing then).
        rank, world_size: this rank and the job's size (for the report).
        connect_store: returns a client of the job's rendezvous store with the given timeout, or
            None; used for heartbeats so a stalled rank can be named.
        setting: how the timeout was set, for the message.
        reporter: the rank that reads the heartbeats and writes the report.
    """

    _KEY = "tinyllama/heartbeat/{}"
    _REPORTED = "tinyllama/stall-reported"

    def __init__(self, timeout_s: Optional[float], rank: int, world_size: int,
                 connect_store: Optional[Callable[[float], object]] = None,
                 setting: str = "train.stall_timeout_minutes", reporter: int = 0) -> None:
        self.timeout_s = timeout_s
        self.rank, self.world_size = rank, world_size
        self.setting = setting
        self.reporter = reporter
        self._connect_store = connect_store
        self.interval_s = min(30.0, max(0.2, (timeout_s or 0) / 6))
        self._store_timeout_s = min(10.0, max(1.0, (timeout_s or 0) / 3))
        # The reporter's two reads, the beats between them and its own timer's lag.
        self.report_s = 4 * self.interval_s + 2 * self._store_timeout_s + 5
        self._sleep = time.sleep
        self._lock = threading.Lock()
        self._last: Optional[tuple[float, float, int, str]] = None  # monotonic, wall, step, what
        self._last_step_done: Optional[tuple[int, float]] = None
        self._beat = 0
        self._store = None
        self._previous_status: Optional[dict] = None
        self._done = threading.Event()
        self._exiting = False
        from megatron_tinyllama.parallel.init import read_launcher_env

        launcher = read_launcher_env()  # ranks are consecutive per node, as deepspeed and torchrun start them
        self._where_am_i = {"node": rank // max(1, launcher.local_world_size),
                            "host": socket.gethostname()}

    @property
    def collective_timeout_s(self) -> Optional[float]:
        """The process groups' timeout this watchdog sets: later than its own report."""
        return self.timeout_s and self.timeout_s + self.interval_s + self.report_s + 5

    def __enter__(self) -> "StallWatchdog":
        if self.timeout_s:
            from megatron_tinyllama.parallel.init import set_process_group_timeouts

            groups = set_process_group_timeouts(self.collective_timeout_s)
            if groups:
                logger.info("collective timeout: %.0f s on %d process groups (%s = %g min, plus the "
                            "stall report)", self.collective_timeout_s, groups, self.setting,
                            self.timeout_s / 60)
            # Two threads: a store call to a stopped host can block past its timeout (seen with
            # rank 0 stopped), and must not keep the clock from being checked.
            threading.Thread(target=self._run, name="stall-watchdog", daemon=True).start()
            if self._connect_store is not None:
                threading.Thread(target=self._heartbeats, name="stall-heartbeat", daemon=True).start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and is_peer_lost(exc):
            # Named here, not as gloo's 97-line traceback: the heartbeats (still going, the
            # other survivors' too) tell the lost ranks from the living.
            self._exiting = True
            self._report_lost_peer(exc)
            self._done.set()
            _hard_exit(EXIT_PEER_LOST)
        self._done.set()

    def _report_lost_peer(self, error: BaseException) -> None:
        last = self._snapshot()
        where = _where(last[2], last[3]) if last else "start"
        # gloo's line, less its source location and its advice: "Connection closed by peer [ip]:port"
        first_line = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).strip().splitlines() or [""])[0])
        first_line = first_line.split(". ")[0][:300] or type(error).__name__
        lines = [f"rank {self.rank}: a peer is gone, in {where}: {first_line}"]
        store = self._store
        if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
            # Under torchrun's elastic agent every second here delays the restart (telling the
            # lost from the living takes two heartbeat intervals, up to a minute); the restart
            # names the lost node instead (megatron_tinyllama.elastic.record_world).
            lines.append("torchrun's elastic agent restarts the ranks on the nodes left; the "
                         "restart names the node lost")
        elif store is None:
            lines.append("no heartbeats tell which rank (the stall watchdog is off: "
                         f"{self.setting} is null, or the rendezvous store was never reached)")
        else:
            first = self._read_peers(store)
            if first is None:
                lines.append("the rendezvous store (hosted by rank 0's process) does not answer: "
                             "rank 0's node is lost or unreachable")
            else:
                self._sleep(2 * self.interval_s + 0.5)  # a live peer beats at least twice meanwhile
                second = self._read_peers(store) or {}
                lost = [peer for peer in range(self.world_size) if peer != self.rank
                        and (peer not in second
                             or (peer in first and second[peer]["beat"] == first[peer]["beat"]))]
                for peer in lost:
                    beat = second.get(peer) or first.get(peer)
                    at = (f"its last heartbeat: {_where(beat['step'], beat['what'])}, begun "
                          f"{_clock(beat['since'])}") if beat else "no heartbeat at all"
                    node = (f"node {beat['node']}, host {beat['host']}" if beat and "node" in beat
                            else "node unknown")
                    lines.append(f"rank {peer} ({node}) lost: {at}")
                if not lost:
                    lines.append("every other rank's heartbeat goes on: the connection between "
                                 "the nodes failed, not a process")
        lines.append(f"exiting with status {EXIT_PEER_LOST}; the last complete checkpoint is intact: "
                     "the same command resumes once the node is back, or on the nodes left "
                     "(the checkpoint is resharded to the new world)")
        logger.error("peer lost:\n  %s", "\n  ".join(lines))

    def progress(self, step: int, what: str) -> None:
        """This rank is starting ``what`` (``"step"``, ``"evaluation"``, ``"checkpoint save"``)."""
        with self._lock:
            if self._last is not None and self._last[3] == "step":
                self._last_step_done = (self._last[2], time.time())
            self._last = (time.monotonic(), time.time(), step, what)

    def _snapshot(self) -> Optional[tuple[float, float, int, str]]:
        with self._lock:
            return self._last

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            last = self._snapshot()
            if self._exiting:  # a lost peer is being reported
                return
            if last is not None and time.monotonic() - last[0] >= self.timeout_s:
                self._report(self._store, last)
                _hard_exit(EXIT_STALLED)

    def heartbeat(self, last) -> dict:
        """This rank's heartbeat record for progress ``last``."""
        status = collective_status()
        stuck = status and status == self._previous_status and any(
            entered > finished for entered, finished in status.values())
        self._previous_status = status
        # The entries are read only when a collective has been open a whole interval: rare
        # while training goes well, and then the report wants its name.
        return {"beat": self._beat, "step": last[2], "what": last[3], "since": last[1],
                **self._where_am_i, "at": main_thread_at(), "collectives": status,
                "pending": pending_collectives() if stuck else []}

    def _heartbeats(self) -> None:
        try:
            store = self._connect_store(self._store_timeout_s)
        except Exception as err:  # noqa: BLE001 (heartbeats are a help, not a need)
            logger.warning("stall watchdog: no heartbeats, the rendezvous store is not reachable: %s", err)
            return
        self._store = store
        # A beat every interval, and at once on new progress: a rank stopped right after its
        # first steps (or a fast run) still leaves a heartbeat naming where it was.
        published, next_beat = None, 0.0
        while not self._done.wait(min(0.1, self.interval_s)):
            last = self._snapshot()
            if last is None or store is None:
                continue
            now = time.monotonic()
            if last is published and now < next_beat:
                continue
            published, next_beat = last, now + self.interval_s
            self._beat += 1
            try:
                store.set(self._KEY.format(self.rank), json.dumps(self.heartbeat(last)))
            except Exception:  # noqa: BLE001 (the store's host may be the stalled one)
                pass

    def _in_thread(self, call: Callable[[], object], wait_s: float):
        """``call()`` in a thread of its own, None when it does not return within ``wait_s``: a
        store call to a stopped host may never return."""
        found: dict = {}

        def run() -> None:
            try:
                found["value"] = call()
            except Exception:  # noqa: BLE001 (a timeout or a closed store: no answer)
                pass

        thread = threading.Thread(target=run, name="stall-read", daemon=True)
        thread.start()
        thread.join(wait_s)
        return found.get("value")

    def _read_peers(self, store) -> Optional[dict[int, dict]]:
        """Every peer's last heartbeat, in one batched read (two calls); None when the store does
        not answer within its timeout. A rank that never beat is left out (then one ``check`` per
        rank: only when some rank stopped before its first step)."""
        peers = [r for r in range(self.world_size) if r != self.rank]
        keys = [self._KEY.format(r) for r in peers]

        def read() -> dict:
            if not keys:
                return {}
            present = list(zip(peers, keys))
            if not store.check(keys):
                present = [(r, k) for r, k in present if store.check([k])]
            values = store.multi_get([k for _, k in present]) if present else []
            return {r: json.loads(v) for (r, _), v in zip(present, values)}

        return self._in_thread(read, self._store_timeout_s + 1)

    def _peer_report(self, store, own: dict) -> list[str]:
        if store is None:
            return ["the other ranks cannot be asked (no rendezvous store)"]
        first = self._read_peers(store)
        if first is None:
            return ["the rendezvous store (hosted by rank 0's process) does not answer: rank 0 is "
                    "stalled, or its machine is unreachable"]
        self._sleep(2 * self.interval_s + 0.5)  # a live peer beats at least twice meanwhile
        second = self._read_peers(store) or {}
        lines, responding = [], {self.rank: own}
        for peer in range(self.world_size):
            if peer == self.rank:
                continue
            before, after = first.get(peer), second.get(peer)
            if after is None:
                lines.append(f"rank {peer}: no heartbeat at all (it stopped before its first step began)")
            elif before is not None and after["beat"] == before["beat"]:
                lines.append(f"rank {peer}: NOT RESPONDING (stopped, hung in the kernel or gone); "
                             f"its last heartbeat: {_where(after['step'], after['what'])}, begun "
                             f"{_clock(after['since'])}")
                responding[peer] = {**after, "at": None}  # its stack is from before it stopped
            else:
                lines.append(f"rank {peer}: alive, in {_where(after['step'], after['what'])} since "
                             f"{_clock(after['since'])}, {_collective_text(after)}"
                             + (f", at {after['at']}" if after.get("at") else ""))
                responding[peer] = after
        return lines + holding_up(responding)

    def _await_report(self, store) -> str:
        """One store call: wait for the reporter's report, and say where it is.

        On a client of its own: a client serves one call at a time, and the heartbeats must go on
        meanwhile (the reporter tells a live rank from a stopped one by them)."""
        if store is None:
            return "the other ranks cannot be asked (no rendezvous store)"
        connected, found = threading.Event(), {}

        def wait() -> None:
            try:
                own = self._connect_store(self.report_s)
                connected.set()
                own.wait([self._REPORTED], datetime.timedelta(seconds=self.report_s))
                found["reported"] = True
            except Exception:  # noqa: BLE001 (a timeout or a closed store: no report)
                pass

        thread = threading.Thread(target=wait, name="stall-read", daemon=True)
        thread.start()
        # A new client's handshake is answered at once while the store's host runs. When that
        # host (rank 0) is the rank stalled, no report can come through it: waiting report_s for
        # one only delayed the exit (under torchrun's elastic agent, the restart: 25 s at a 15 s
        # stall timeout). The heartbeats cannot tell: a TCPStore set is not answered, so it
        # "succeeds" into the socket's buffer while the host is stopped.
        if not connected.wait(self._store_timeout_s + 1) and not found:
            return (f"the rendezvous store (hosted by rank 0's process) does not answer: rank 0 is "
                    f"stalled, or its machine is unreachable (a new client had no answer within "
                    f"{self._store_timeout_s + 1:.0f} s; no report can come from it)")
        thread.join(self.report_s + 1)
        if found.get("reported"):
            return f"rank {self.reporter}'s log names the ranks that stalled"
        return (f"rank {self.reporter} wrote no report within {self.report_s:.0f} s and the "
                f"rendezvous store (hosted by rank 0's process) does not answer: rank 0 is "
                f"stalled, or its machine is unreachable")

    def _report(self, store, last) -> None:
        waited = time.monotonic() - last[0]
        done = self._last_step_done
        previous = f"step {done[0]} finished at {_clock(done[1])}" if done else "no step finished yet"
        own = self.heartbeat(last)
        own["pending"] = own["pending"] or pending_collectives()
        lines = [f"rank {self.rank}: no progress for {waited:.0f} s ({self.setting} = "
                 f"{self.timeout_s / 60:g} min): in {_where(last[2], last[3])} since "
                 f"{_clock(last[1])}; last progress: {previous}; {_collective_text(own)}, at "
                 f"{own['at']}"]
        if self.rank == self.reporter:
            lines += self._peer_report(store, own)
        else:
            lines.append(self._await_report(store))
        lines.append(f"exiting with status {EXIT_STALLED}; the last complete checkpoint is intact, "
                     f"the same command resumes from it once the stalled rank's cause is fixed")
        logger.error("stalled run:\n  %s", "\n  ".join(lines))
        self._dump_flight_recorder()
        if self.rank == self.reporter and store is not None:  # the others may exit now
            self._in_thread(lambda: store.set(self._REPORTED, "1"), self._store_timeout_s)

    def _dump_flight_recorder(self) -> None:
        """This rank's flight-recorder trace to ``<prefix><rank>`` (PyTorch's dump format)."""
        from megatron_tinyllama.parallel.init import flight_recorder_prefix

        prefix = flight_recorder_prefix()
        if prefix is None:
            return
        try:
            from torch._C._distributed_c10d import _dump_fr_trace

            path = f"{prefix}{self.rank}"
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(_dump_fr_trace())
            logger.error("flight recorder (collectives per rank; PyTorch's torchfrtrace reads it): %s",
                         path)
        except Exception as err:  # noqa: BLE001 (the report is out already)
            logger.warning("flight recorder dump failed: %s", err)
