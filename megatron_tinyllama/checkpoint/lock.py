"""One job per ``checkpoint.save_dir``.

This module owns the lock that keeps a second job off a save_dir a job is using. Two jobs on one
save_dir interleave their steps in ``metrics.jsonl``, replace each other's checkpoints and prune
directories the other is about to rename.

The lock is ``fcntl.flock`` on ``<save_dir>/job.lock``, taken by global rank 0 at start and held
until the run ends. The kernel (or, on NFS, the lock manager) drops it when the process dies, so a
crashed or killed job never leaves it stuck. The file also records the holder (host, pid, start
time, command) so that a refused job names it; a job that ends cleanly empties the record.

Where the filesystem cannot ``flock`` (some parallel filesystems mounted without lock support),
the record is the lock: a record naming a process that no longer runs on this host is stale and
taken over; one naming another host is taken as live (this host cannot tell), and the message
says to remove the file once that job is gone. On a filesystem whose ``flock`` is local to each
node (NFS mounted with ``local_lock=flock``), jobs on different nodes do not see each other's
lock: a limit of that mount, not detectable from here.

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
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_tinyllama.checkpoint.training import CheckpointError

logger = logging.getLogger(__name__)

LOCK_FILE = "job.lock"


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


def _record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join(sys.argv)[:400]}


class SaveDirLock:
    """The held lock of one save_dir (on rank 0; a no-op object elsewhere). ``release`` ends it."""

    def __init__(self, path: Optional[Path] = None, handle=None) -> None:
        self.path = path
        self._handle = handle

    @property
    def held(self) -> bool:
        return self._handle is not None

    def release(self) -> None:
        """Empty the record and drop the lock (idempotent)."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
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


def acquire_save_dir_lock(save_dir: str | Path) -> SaveDirLock:
    """Take the lock of ``save_dir`` for this process (creating the folder), or refuse.

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
    if not flock_works and record and "pid" in record:
        here = record.get("host") == socket.gethostname()
        if not here or (_pid_alive(int(record["pid"])) and int(record["pid"]) != os.getpid()):
            handle.close()
            raise SaveDirBusyError(
                f"checkpoint.save_dir={save_dir} is recorded as in use by another job: "
                f"{describe_holder(record)}; lock file {path}. If that job is no longer running, "
                "remove the lock file")
    if record:
        logger.warning("%s: taking over the lock of a job that ended without releasing it (%s)",
                       path, describe_holder(record))
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(_record()))
    handle.flush()
    os.fsync(handle.fileno())
    return SaveDirLock(path, handle)


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
