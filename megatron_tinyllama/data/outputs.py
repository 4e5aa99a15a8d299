"""How data outputs reach their final names: temporary names, and what a killed writer left.

This module owns the rules every writer of datasets follows (:class:`.indexed.IndexedDatasetWriter`,
used by preprocessing and merging): write under ``<final name>.tmp<pid>.<host>``, rename when
complete, and before starting, check that the output's folder can exist and be written (a read-only
mount, a folder without write permission: one line naming the prefix and the folder, nothing
left behind) and remove the temporaries of a writer of the same output that was killed. Only files of a process that no
longer runs on this machine are removed: a writer still at work, or one on another machine
sharing the disk, keeps its files. No reader ever opens a temporary name.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import socket
from typing import BinaryIO, Sequence

logger = logging.getLogger(__name__)

# What follows a final name in a temporary one: ".tmp<pid>" (older runs) or ".tmp<pid>.<host>".
_TAG = re.compile(r"\.tmp(\d+)(?:\.(.+))?$")


class OutputPathError(ValueError):
    """An output prefix that cannot be written (a file stands where its folder should be, the
    folder is read-only or not writable)."""


def _cannot_write(prefix: str, folder: str, err: OSError) -> OutputPathError:
    why = "is on a read-only file system" if err.errno == errno.EROFS else \
        f"cannot be written ({err.strerror})"
    return OutputPathError(f"{prefix}: cannot write here, {folder} {why}")


def open_temporaries(prefix: str, paths: Sequence[str]) -> list[BinaryIO]:
    """Open ``paths`` (temporaries of ``prefix``) for writing: all of them, or none.

    Raises:
        OutputPathError: One cannot be created (read-only folder, no permission, no space);
            those already opened are closed and removed.
    """
    streams: list[BinaryIO] = []
    try:
        for path in paths:
            streams.append(open(path, "wb"))
    except OSError as err:
        for stream in streams:
            stream.close()
            os.remove(stream.name)
        raise _cannot_write(prefix, os.path.dirname(os.path.abspath(prefix)), err) from None
    return streams


def temporary_tag() -> str:
    """The suffix this process writes its temporaries under: ``.tmp<pid>.<host>``."""
    return f".tmp{os.getpid()}.{socket.gethostname()}"


def remove_stale_temporaries(final_paths: Sequence[str]) -> list[str]:
    """Delete temporaries of ``final_paths`` whose writer no longer runs here; returns them."""
    host = socket.gethostname()
    removed = []
    for final in final_paths:
        for path in glob.glob(glob.escape(final) + ".tmp*"):
            match = _TAG.fullmatch(path[len(final):])
            if match is None or (match.group(2) or host) != host:
                continue
            if _process_alive(int(match.group(1))):
                continue
            try:
                os.remove(path)
            except FileNotFoundError:  # its owner's abort or another cleaner got there first
                continue
            except OSError as err:  # a read-only folder: nothing could be written there either
                raise _cannot_write(final, os.path.dirname(os.path.abspath(final)), err) from None
            logger.warning("removed %s, left by process %s that no longer runs", path,
                           match.group(1))
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def make_parent(prefix: str) -> None:
    """Create the folder of ``prefix``.

    Raises:
        OutputPathError: A file stands where a folder of the path should be (named), or the
            folder cannot be created (no permission, a read-only file system: the folder named).
    """
    parent = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = parent
        while os.path.dirname(blocker) != blocker and not os.path.isfile(blocker):
            blocker = os.path.dirname(blocker)
        what = f"{blocker} is a file, not a folder" if os.path.isfile(blocker) else \
            f"{parent} cannot be created"
        raise OutputPathError(f"{prefix}: cannot write here, {what}") from None
    except PermissionError as err:
        raise OutputPathError(f"{prefix}: cannot create the folder {parent} "
                              f"({err.strerror})") from None
    except OSError as err:  # e.g. EROFS: the folder to create is under a read-only mount
        raise _cannot_write(prefix, _existing_ancestor(parent), err) from None


def _existing_ancestor(path: str) -> str:
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path
