"""This module owns noticing, from inside a rank, that the job can no longer go on as it should.

* :class:`LauncherWatch`: the ``deepspeed`` launcher that started this rank is gone. A cluster's
  scheduler signals the launcher's PID, not the ranks; the runner (``deepspeed``, deepspeed's
  ``launcher/runner.py``) installs no handler when it runs this node itself (no pdsh), so SIGTERM
  ends it at once (143) and SIGINT with a KeyboardInterrupt (130), while its child
  ``deepspeed.launcher.launch`` (which would pass a SIGTERM on to the ranks) and the ranks under
  it carry on as orphans. So each rank watches its parent (``launch``) and the parent's parent
  (the runner) and, when either is gone, asks the run to stop as SIGTERM to a rank does: finish
  the step, save, exit 3. ``PR_SET_PDEATHSIG`` would not do: it fires when the *parent* dies,
  and here the parent survives its own parent.
* :class:`StallWatchdog`: no progress (a step, an evaluation, a save) within
  ``train.stall_timeout_minutes``. A rank blocked in a collective cannot act in its main thread,
  so a thread in every rank watches the time since the last progress, publishes a heartbeat in
  the job's rendezvous store (a client of its own, with a short timeout) and, when the time is
  up, names the ranks whose heartbeat stopped (a stopped or hung process), its own step and last
  progress, and ends the process with :data:`EXIT_STALLED`; the launcher then stops the others.
  The last complete checkpoint is untouched: a stall never leaves a save half-counted, because a
  checkpoint counts only once its ``trainer_state.json`` is written.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Callable, Optional

logger = logging.getLogger(__name__)

EXIT_STALLED = 4
"""Exit status of a rank that saw no progress for ``train.stall_timeout_minutes``."""

_POLL_S = 1.0


def _is_deepspeed_launch(cmdline: list[str]) -> bool:
    return any("deepspeed.launcher.launch" in arg for arg in cmdline[:4])


def _is_deepspeed_runner(cmdline: list[str]) -> bool:
    return any(os.path.basename(arg) in ("deepspeed", "ds") or "deepspeed.launcher.runner" in arg
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
        """deepspeed's per-node ``launch`` (this rank's parent) and the ``deepspeed`` runner above
        it, as (``psutil.Process``, name); [] when this rank was not started by them."""
        import psutil

        try:
            parent = psutil.Process(os.getppid())
            if not _is_deepspeed_launch(parent.cmdline()):
                return []
            found = [(parent, "deepspeed's per-node launcher (deepspeed.launcher.launch)")]
            runner = parent.parent()
            if runner is not None and _is_deepspeed_runner(runner.cmdline()):
                found.append((runner, "the deepspeed launcher"))
        except psutil.Error:
            return []
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


class StallWatchdog:
    """End the rank when no progress is reported for ``timeout_s``, naming who stalled.

    Use as a context manager around the training loop and call :meth:`progress` before each
    step, evaluation and save. The timer runs from the first :meth:`progress` call.

    Args:
        timeout_s: seconds without progress before the rank exits with :data:`EXIT_STALLED`;
            None: no watchdog (:meth:`progress` costs nothing then).
        rank, world_size: this rank and the job's size (for the report).
        connect_store: returns a client of the job's rendezvous store with the given timeout, or
            None; used for heartbeats so a stalled rank can be named.
        setting: how the timeout was set, for the message.
    """

    _KEY = "tinyllama/heartbeat/{}"

    def __init__(self, timeout_s: Optional[float], rank: int, world_size: int,
                 connect_store: Optional[Callable[[float], object]] = None,
                 setting: str = "train.stall_timeout_minutes") -> None:
        self.timeout_s = timeout_s
        self.rank, self.world_size = rank, world_size
        self.setting = setting
        self._connect_store = connect_store
        self.interval_s = min(30.0, max(0.2, (timeout_s or 0) / 6))
        self._store_timeout_s = min(10.0, max(1.0, (timeout_s or 0) / 3))
        self._lock = threading.Lock()
        self._last: Optional[tuple[float, float, int, str]] = None  # monotonic, wall, step, what
        self._last_step_done: Optional[tuple[int, float]] = None
        self._beat = 0
        self._store = None
        self._done = threading.Event()

    def __enter__(self) -> "StallWatchdog":
        if self.timeout_s:
            # Two threads: a store call to a stopped host can block past its timeout (seen with
            # rank 0 stopped), and must not keep the clock from being checked.
            threading.Thread(target=self._run, name="stall-watchdog", daemon=True).start()
            if self._connect_store is not None:
                threading.Thread(target=self._heartbeats, name="stall-heartbeat", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

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
            if last is not None and time.monotonic() - last[0] >= self.timeout_s:
                self._report(self._store, last)
                _hard_exit(EXIT_STALLED)

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
                store.set(self._KEY.format(self.rank), json.dumps(
                    {"beat": self._beat, "step": last[2], "what": last[3], "since": last[1]}))
            except Exception:  # noqa: BLE001 (the store's host may be the stalled one)
                pass

    def _read_peers(self, store) -> Optional[dict[int, dict]]:
        """Every peer's last heartbeat; None when the store does not answer within its timeout
        (read in a thread of its own: a store call to a stopped host may never return)."""
        keys = {r: self._KEY.format(r) for r in range(self.world_size) if r != self.rank}
        found: dict = {}

        def read() -> None:
            found["peers"] = {r: json.loads(store.get(k)) for r, k in keys.items() if store.check([k])}

        reader = threading.Thread(target=read, name="stall-read", daemon=True)
        reader.start()
        reader.join(self._store_timeout_s + 1)
        return found.get("peers")

    def _peer_report(self, store) -> list[str]:
        if store is None:
            return ["the other ranks cannot be asked (no rendezvous store)"]
        first = self._read_peers(store)
        if first is None:
            return ["the rendezvous store (hosted by rank 0's process) does not answer: rank 0 is "
                    "stalled, or its machine is unreachable"]
        time.sleep(2 * self.interval_s + 0.5)  # a live peer beats at least twice meanwhile
        second = self._read_peers(store) or {}
        lines = []
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
            else:
                lines.append(f"rank {peer}: alive, in {_where(after['step'], after['what'])} since "
                             f"{_clock(after['since'])}")
        return lines

    def _report(self, store, last) -> None:
        waited = time.monotonic() - last[0]
        done = self._last_step_done
        previous = f"step {done[0]} finished at {_clock(done[1])}" if done else "no step finished yet"
        lines = [f"rank {self.rank}: no progress for {waited:.0f} s ({self.setting} = "
                 f"{self.timeout_s / 60:g} min): in {_where(last[2], last[3])} since "
                 f"{_clock(last[1])}; last progress: {previous}"]
        lines += self._peer_report(store)
        lines.append(f"exiting with status {EXIT_STALLED}; the last complete checkpoint is intact, "
                     f"the same command resumes from it once the stalled rank's cause is fixed")
        logger.error("stalled run:\n  %s", "\n  ".join(lines))
