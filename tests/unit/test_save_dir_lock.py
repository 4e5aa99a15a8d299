"""One job per checkpoint.save_dir: a second is refused naming the holder; a dead holder's lock
does not stick, with flock and with the record-only fallback."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tinyllama.checkpoint import lock as lock_module
from megatron_tinyllama.checkpoint.lock import (LOCK_FILE, SaveDirBusyError, acquire_save_dir_lock,
                                                lock_save_dir)

REPO = Path(__file__).resolve().parents[2]
HOLD = ("import sys, time\n"
        "from megatron_tinyllama.checkpoint.lock import acquire_save_dir_lock\n"
        "lock = acquire_save_dir_lock(sys.argv[1])\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_job_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path, caplog):
    save_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(save_dir)], stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SaveDirBusyError) as refused:
            lock_save_dir(str(save_dir))  # no process group: this process decides alone
        message = str(refused.value)
        assert f"checkpoint.save_dir={save_dir} is in use by another job" in message
        assert f"host {socket.gethostname()}, pid {holder.pid}, started 20" in message
        assert str(save_dir / LOCK_FILE) in message
    finally:
        holder.send_signal(signal.SIGKILL)  # as a crash or the OOM killer would end it
        holder.wait()
    with caplog.at_level(logging.WARNING, logger=lock_module.__name__):
        lock = acquire_save_dir_lock(save_dir)
    assert f"pid {holder.pid}" in caplog.text and "ended without releasing" in caplog.text
    assert json.loads((save_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert (save_dir / LOCK_FILE).read_text() == ""  # a clean end leaves no holder named
    acquire_save_dir_lock(save_dir).release()  # and the next job takes it without a word


def test_without_flock_the_record_is_the_lock_and_a_dead_pid_on_this_host_is_stale(tmp_path, monkeypatch,
                                                                                   caplog):
    def no_flock(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_flock)
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    record = {"host": socket.gethostname(), "started": "2026-01-01 00:00:00 UTC", "command": "x"}
    (save_dir / LOCK_FILE).write_text(json.dumps({**record, "pid": os.getppid()}))  # alive
    with pytest.raises(SaveDirBusyError, match=rf"pid {os.getppid()}, .*remove the lock file"):
        acquire_save_dir_lock(save_dir)
    (save_dir / LOCK_FILE).write_text(json.dumps({**record, "host": "node-7", "pid": 1}))
    with pytest.raises(SaveDirBusyError, match="host node-7, pid 1"):  # cannot be checked: live
        acquire_save_dir_lock(save_dir)
    dead = _dead_pid()
    (save_dir / LOCK_FILE).write_text(json.dumps({**record, "pid": dead}))
    with caplog.at_level(logging.WARNING, logger=lock_module.__name__):
        lock = acquire_save_dir_lock(save_dir)
    assert f"pid {dead}" in caplog.text and "cannot flock" in caplog.text
    assert json.loads((save_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_save_dir_that_cannot_be_created_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(lock_module.CheckpointError, match=rf"checkpoint.save_dir={tmp_path / 'file' / 'run'}: cannot create"):
        lock_save_dir(str(tmp_path / "file" / "run"))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_without_flock_a_lease_not_renewed_for_two_periods_is_taken_over_from_another_host(
        tmp_path, monkeypatch, caplog):
    """A job killed with its node (the record names another host) does not refuse every requeue:
    its lease goes stale after twice its period, and the requeue says how long that is."""
    def no_flock(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_flock)
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    clock = Clock(1_000_000.0)
    holder = {"host": "node-7", "pid": 4242, "started": "2026-01-01 00:00:00 UTC", "command": "x",
              "renewed": clock.now - 50, "lease_s": 60}
    (save_dir / LOCK_FILE).write_text(json.dumps(holder))
    with pytest.raises(SaveDirBusyError, match=r"host node-7, pid 4242, .*lease renewed 50 s ago\. "
                                               r"If that job is gone .* stale 70 s from now"):
        acquire_save_dir_lock(save_dir, lease_s=60, clock=clock)
    clock.now += 71  # 121 s since its last renewal: the node is gone
    with caplog.at_level(logging.WARNING, logger=lock_module.__name__):
        lock = acquire_save_dir_lock(save_dir, lease_s=60, clock=clock)
    assert "host node-7, pid 4242" in caplog.text and "lease was last renewed 121 s ago" in caplog.text
    mine = json.loads((save_dir / LOCK_FILE).read_text())
    assert (mine["pid"], mine["renewed"], mine["lease_s"]) == (os.getpid(), clock.now, 60)
    lock.release()
    assert (save_dir / LOCK_FILE).read_text() == ""


def test_without_flock_the_holder_renews_its_lease_until_it_releases(tmp_path, monkeypatch):
    import time

    def no_flock(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_flock)
    save_dir = tmp_path / "run"
    lock = acquire_save_dir_lock(save_dir, lease_s=0.05)
    first = json.loads((save_dir / LOCK_FILE).read_text())["renewed"]
    deadline = time.monotonic() + 5
    while json.loads((save_dir / LOCK_FILE).read_text() or "{}").get("renewed") == first:
        assert time.monotonic() < deadline, "the lease was never renewed"
        time.sleep(0.02)
    record = json.loads((save_dir / LOCK_FILE).read_text())
    assert record["renewed"] > first and record["pid"] == os.getpid()
    lock.release()
    time.sleep(0.2)  # no renewal after the release rewrites the emptied record
    assert (save_dir / LOCK_FILE).read_text() == ""
