"""One job per ``checkpoint.save_dir``.

This module owns the lock that keeps a second job off a save_dir a job is using. Two jobs on one
save_dir interleave their steps in ``metrics.jsonl``, replace each other's checkpoints and prune
directories the other is about to rename.

The lock is ``fcntl.flock`` on ``<save_dir>/job.lock``, taken by global rank 0 at start and held
until the run ends. The kernel (or, on NFS, the lock manager) drops it when the process dies, so a
crashed or killed job never leaves it stuck. The file also records the holder (host, pid, start
time, command) so that a refused job names it; a job that ends cleanly empties the record.

Where the filesystem cannot ``flock`` (Lustre's default ``noflock``, some parallel filesystems),
the record is the lock, held as a lease: the holder rewrites its record's ``renewed`` time every
``lease_s`` (:data:`LEASE_S`, a background thread), and a record not renewed for twice that is
stale and taken over, whichever host it names. So a job killed with its node does not refuse
every requeue until a person removes the file: the requeue waits out the lease (it says how long)
or takes over. A record naming a process that no longer runs on this host is stale at once. The
lease compares the holder's clock with the reader's: nodes whose clocks differ by more than
``lease_s`` need a longer lease. A record written before leases (no ``renewed``) naming another
host is taken as live, as before, and the message says to remove the file once that job is gone.
On a filesystem whose ``flock`` is local to each node (NFS mounted with ``local_lock=flock``),
jobs on different nodes do not see each other's lock: a limit of that mount, not detectable from
here.

Only rank 0 touches the file; the other ranks learn its verdict by a broadcast, so every rank of a
refused job stops at the same point (exit 2), none waits for a peer that has left.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from megatron_tinyllama.checkpoint.training import CheckpointError

logger = logging.getLogger(__name__)

LOCK_FILE = "job.lock"

LEASE_S = 60.0
"""Seconds between renewals of the record where ``flock`` is missing; stale after twice this."""


class SaveDirBusyError(CheckpointError):
    """Another live job holds ``checkpoint.save_dir``."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _read_record(handle) -> Optional[dict]:
    handle.seek(0)
    text = handle.read()
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {"unreadable": text[:200]}
    return record if isinstance(record, dict) else {"unreadable": text[:200]}


def describe_holder(record: Optional[dict]) -> str:
    """``host H, pid P, started T (command)`` from a lock record."""
    if not record:
        return "a job that left no record"
    if "unreadable" in record:
        return f"a job whose record is unreadable ({record['unreadable']!r})"
    text = f"host {record.get('host')}, pid {record.get('pid')}, started {record.get('started')}"
    return text + (f" ({record['command']})" if record.get("command") else "")


def _record(renewed: Optional[float] = None, lease_s: Optional[float] = None) -> dict:
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
              "command": " ".join(sys.argv)[:400]}
    if renewed is not None:
        record.update(renewed=renewed, lease_s=lease_s)
    return record


def _write_record(handle, record: dict) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(record))  # "a+": writes go to the end, which is byte 0 after truncate
    handle.flush()
    os.fsync(handle.fileno())


def lease_age(record: dict, now: float) -> Optional[float]:
    """Seconds since the holder last renewed its lease; None for a record without a lease."""
    try:
        return now - float(record["renewed"])
    except (KeyError, TypeError, ValueError):
        return None


class _LeaseRenewal:
    """Rewrites the holder's record with a new ``renewed`` time every ``lease_s`` (a daemon
    thread), until stopped; stops, with an error, if the record names another holder (this process
    was stopped past the lease and a requeue took over)."""

    def __init__(self, handle, record: dict, lease_s: float, clock: Callable[[], float],
                 path: Path) -> None:
        self.handle, self.record, self.lease_s, self.clock, self.path = handle, record, lease_s, clock, path
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="save-dir-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s):
            with self.lock:
                if self._stop.is_set():
                    return
                try:
                    current = _read_record(self.handle) or {}
                    if (current.get("host"), current.get("pid")) != (self.record["host"], self.record["pid"]):
                        logger.error("%s: the lease was taken over by %s while this job held it (was "
                                     "it stopped longer than %.0f s?); two jobs may now share the save_dir",
                                     self.path, describe_holder(current), 2 * self.lease_s)
                        return
                    self.record["renewed"] = self.clock()
                    _write_record(self.handle, self.record)
                except OSError as err:  # the next renewal tries again; the lease has 2 periods
                    logger.warning("%s: renewing the lease failed: %s", self.path, err.strerror or err)

    def stop(self) -> None:
        self._stop.set()
        with self.lock:  # a renewal under way finishes before the record is emptied
            pass


class SaveDirLock:
    """The held lock of one save_dir (on rank 0; a no-op object elsewhere). ``release`` ends it."""

    def __init__(self, path: Optional[Path] = None, handle=None,
                 renewal: Optional[_LeaseRenewal] = None) -> None:
        self.path = path
        self._handle = handle
        self._renewal = renewal

    @property
    def held(self) -> bool:
        return self._handle is not None

    def release(self) -> None:
        """Empty the record and drop the lock (idempotent)."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        if self._renewal is not None:
            self._renewal.stop()
        try:
            handle.seek(0)
            handle.truncate()
            handle.flush()
        except OSError:  # the record is informative; losing it must not fail a finished run
            pass
        finally:
            try:
                fcntl.flock(handle, fcntl.LOCK_UN)
            except OSError:
                pass
            handle.close()


def acquire_save_dir_lock(save_dir: str | Path, *, lease_s: float = LEASE_S,
                          clock: Callable[[], float] = time.time) -> SaveDirLock:
    """Take the lock of ``save_dir`` for this process (creating the folder), or refuse.

    ``lease_s`` and ``clock`` serve where ``flock`` is missing (see the module): the renewal period
    (stale after twice it) and the wall clock (tests inject one).

    Raises:
        SaveDirBusyError: another live job holds it (named: host, pid, start time).
        CheckpointError: the folder or its lock file cannot be created.
    """
    save_dir = Path(save_dir)
    path = save_dir / LOCK_FILE
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as err:
        raise CheckpointError(f"checkpoint.save_dir={save_dir}: cannot create {path} "
                              f"({err.strerror or err})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        flock_works = True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = describe_holder(_read_record(handle))
            handle.close()
            raise SaveDirBusyError(
                f"checkpoint.save_dir={save_dir} is in use by another job: {holder}; lock file "
                f"{path}. Two jobs on one save_dir mix their metrics and replace each other's "
                "checkpoints: wait for that job to end, stop it, or give this run another "
                "checkpoint.save_dir") from None
        flock_works = False
        logger.warning("%s: this filesystem cannot flock (%s); the lock is the holder record only",
                       path, err.strerror or err)
    record = _read_record(handle)
    now = clock()
    age = lease_age(record, now) if record else None
    if not flock_works and record and "pid" in record:
        here = record.get("host") == socket.gethostname()
        held = float(record.get("lease_s") or lease_s)
        if age is not None:  # a lease: live while renewed, whichever host holds it
            live = age < 2 * held and (not here or _pid_alive(int(record["pid"])))
        else:
            live = not here or _pid_alive(int(record["pid"]))
        if live and int(record["pid"]) == os.getpid() and here:
            live = False  # this very process (a test, or a second acquire after a release failed)
        if live:
            handle.close()
            if age is not None:
                raise SaveDirBusyError(
                    f"checkpoint.save_dir={save_dir} is recorded as in use by another job: "
                    f"{describe_holder(record)}; lock file {path}, its lease renewed {age:.0f} s "
                    f"ago. If that job is gone (killed with its node), its lease is stale "
                    f"{2 * held - age:.0f} s from now and the same command takes over then; or "
                    "remove the lock file") from None
            raise SaveDirBusyError(
                f"checkpoint.save_dir={save_dir} is recorded as in use by another job: "
                f"{describe_holder(record)}; lock file {path}. If that job is no longer running, "
                "remove the lock file")
    if record:
        stale = (f"; its lease was last renewed {age:.0f} s ago" if age is not None and not flock_works
                 else "")
        logger.warning("%s: taking over the lock of a job that ended without releasing it (%s%s)",
                       path, describe_holder(record), stale)
    mine = _record(now, lease_s) if not flock_works else _record()
    _write_record(handle, mine)
    renewal = _LeaseRenewal(handle, mine, lease_s, clock, path) if not flock_works else None
    return SaveDirLock(path, handle, renewal)


def lock_save_dir(save_dir: Optional[str]) -> SaveDirLock:
    """Collective: rank 0 takes the lock of ``save_dir``; every rank returns or raises alike.

    Without torch.distributed the calling process takes it. ``None`` (no save_dir) locks nothing.

    Raises:
        SaveDirBusyError, CheckpointError: on every rank, with rank 0's message.
    """
    if not save_dir:
        return SaveDirLock()
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    lock, verdict = SaveDirLock(), [None]
    if rank == 0:
        try:
            lock = acquire_save_dir_lock(save_dir)
        except CheckpointError as err:
            verdict = [(type(err).__name__, str(err))]
        except OSError as err:  # writing the record: the peers must hear of it, not wait
            verdict = [("CheckpointError", f"checkpoint.save_dir={save_dir}: cannot write the lock "
                                           f"record {Path(save_dir) / LOCK_FILE} ({err.strerror or err})")]
    if distributed:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        kind, message = verdict[0]
        raise (SaveDirBusyError if kind == SaveDirBusyError.__name__ else CheckpointError)(message)
    return lock
