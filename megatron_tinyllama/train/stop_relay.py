"""This module owns passing a stop that one rank was asked for to every rank at once.

A scheduler's pre-emption does not reach the ranks together. DeepSpeed's per-node
``deepspeed.launcher.launch`` ends its ranks one after the other (``terminate_process_tree``:
SIGTERM, up to 30 s, SIGKILL, then the next rank), so the second rank hears of it only once the
first is dead; the ranks' own agreement (the step's all-reduce, train.loop) comes only at the end
of the step in flight. A save needs every rank, so the first rank's 30 s would go by alone.

So the rank that receives the signal sets one key in the job's rendezvous store, and every rank
has a thread waiting on that key (TCPStore ``wait``: one request pending per rank for the whole
run, no polling; a rank that ends sets the key to release them); when it is set, the thread
raises the same stop in its rank's main
thread (SIGUSR1 to the main thread, marked as relayed: it does not count as the rank's own
signal), which starts the save of the last completed step there too
(checkpoint.saving.CheckpointSaver.save_at_signal). Hand-written: neither DeepSpeed's launcher nor
torch's elastic agent passes a signal from one rank to the others.
"""

from __future__ import annotations

import datetime
import logging
import signal
import threading
import time
import uuid
from typing import Callable, Optional

logger = logging.getLogger(__name__)

WAIT_S = 7 * 24 * 3600.0
"""How long one ``wait`` on the store lasts: the run (a timeout makes torch's TCPStore print a
warning; the key set at the end releases the waits instead)."""
_END = "end"


def agreed_relay_key() -> str:
    """The store key of this world's stop, drawn by rank 0 and broadcast (collective: every rank,
    at the same point). Under torch's elastic agent the store outlives a restart and each node's
    agent counts its own restarts (a node that joins later starts at 0), so neither a fixed key
    nor ``TORCHELASTIC_RESTART_COUNT`` would keep an earlier world's stop from stopping this one."""
    import torch.distributed as dist

    drawn = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(drawn, src=0)
    return f"tinyllama/stop/{drawn[0]}"


class StopRelay:
    """Passes this rank's stop to the others and theirs to this one (see the module docstring).

    Args:
        rank: this rank.
        connect: ``timeout_s -> store client`` (parallel.init.connect_rendezvous_store), or None
            for no relay (one process, no store).
        deliver: called in the listening thread with the relayed reason, e.g. ``"a stop
            request from rank 1 (node 0): a signal"``; it must hand the stop to the main thread.
    """

    def __init__(self, rank: int, connect: Optional[Callable[[float], object]],
                 deliver: Callable[[str], None], key: str) -> None:
        self.rank = rank
        self._connect = connect
        self._deliver = deliver
        self._setter = None
        self._closed = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.key = key

    def start(self) -> "StopRelay":
        if self._connect is None:
            return self
        try:
            self._setter = self._connect(10.0)
        except Exception as err:  # noqa: BLE001 - without a store, the step's all-reduce still tells
            logger.info("stop relay off (the rendezvous store cannot be reached: %s)", err)
            return self
        if self._setter is None:
            return self
        self._thread = threading.Thread(target=self._listen, name="stop-relay", daemon=True)
        self._thread.start()
        return self

    def announce(self, reason: str) -> None:
        """Tell every rank (from the signal handler: one store ``set``, bounded by its timeout)."""
        if self._setter is None:
            return
        try:
            self._setter.set(self.key, f"{self.rank}\n{reason}")
        except Exception as err:  # noqa: BLE001 - the end of the step still tells the others
            logger.warning("could not pass the stop on to the other ranks through the store: %s", err)

    def close(self) -> None:
        """Release every rank's waiting thread: this rank is done (the others are ending too,
        or have failed). A daemon thread: never joined."""
        self._closed.set()
        if self._setter is not None:
            try:
                if not self._setter.check([self.key]):
                    self._setter.set(self.key, _END)
            except Exception:  # noqa: BLE001 - the store's host may be gone first
                pass

    def _listen(self) -> None:
        try:
            store = self._connect(WAIT_S + 5)
        except Exception:  # noqa: BLE001
            return
        while not self._closed.is_set():
            began = time.monotonic()
            try:
                store.wait([self.key], datetime.timedelta(seconds=WAIT_S))
                value = store.get(self.key).decode()
            except Exception:  # noqa: BLE001 - a week's timeout, or the store's host gone
                if time.monotonic() - began < WAIT_S / 2:
                    return  # the host gone: the step's all-reduce still tells this rank
                continue
            if self._closed.is_set():
                return
            sender, _, reason = value.partition("\n")
            if sender not in (_END, str(self.rank)):
                self._deliver(reason_from(int(sender), reason))
            return


def reason_from(sender: int, kind: str) -> str:
    """The stop's reason as a rank that was not asked says it (the step's agreement says the same)."""
    from megatron_tinyllama.parallel.init import read_launcher_env

    try:
        node = read_launcher_env().node_of(sender)
    except Exception:  # noqa: BLE001 - the node is a courtesy
        node = "?"
    return f"a stop request from rank {sender} (node {node}): {kind}"


def interrupt_main_thread(signum: int = signal.SIGUSR1) -> None:
    """Run the main thread's handler for ``signum`` (Python runs handlers there only)."""
    signal.pthread_kill(threading.main_thread().ident, signum)
