"""The rank-side watches of train/watchdog.py on real processes (the launcher end to end is in
tests/integration/test_launcher.py, a stopped rank in tests/distributed/test_process_faults.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from megatron_tinyllama.train.loop import StopRequest
from megatron_tinyllama.train.watchdog import (LauncherWatch, StallWatchdog, _is_deepspeed_launch,
                                               _is_deepspeed_runner, holding_up)

REPO = Path(__file__).resolve().parents[2]


def test_a_launcher_process_that_dies_turns_into_a_stop_request():
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watch = LauncherWatch(processes=[(psutil.Process(launcher.pid), "the deepspeed launcher")],
                              poll_s=0.05).start()
        stop = StopRequest(launcher=watch)
        time.sleep(0.3)
        assert not stop.requested and watch.reason is None
        launcher.kill()  # not reaped yet: a zombie counts as gone
        deadline = time.monotonic() + 10
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stop.reason == f"the deepspeed launcher (pid {launcher.pid}) exited"
    finally:
        launcher.kill()
        launcher.wait()


def test_the_launcher_processes_are_recognised_by_their_command_lines():
    # As deepspeed 0.19.8's runner starts the per-node launcher, and as the console script runs.
    launch = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "--node_rank=0"]
    assert _is_deepspeed_launch(launch) and not _is_deepspeed_runner(launch)
    assert _is_deepspeed_runner([sys.executable, "/usr/local/bin/deepspeed", "--hostfile", "h"])
    assert not _is_deepspeed_runner(["/bin/bash", "job.sh"])
    assert not _is_deepspeed_launch([sys.executable, "-m", "pytest"])
    assert LauncherWatch.launcher_processes() == []  # pytest did not start us through deepspeed


class CountingStore:
    """The calls a stall report makes to the job's rendezvous store, counted (a TCPStore serves
    them one at a time: thousands of ranks each calling it N times blame rank 0's host)."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values, self.calls = dict(values), 0

    def check(self, keys):
        self.calls += 1
        return all(k in self.values for k in keys)

    def get(self, key):
        self.calls += 1
        return self.values[key].encode()

    def multi_get(self, keys):  # every rank alive: its beat has moved on at each read
        self.calls += 1
        return [json.dumps({**json.loads(self.values[k]), "beat": self.calls}).encode() for k in keys]

    def set(self, key, value):
        self.calls += 1
        self.values[key] = value

    def wait(self, keys, timeout=None):
        self.calls += 1
        assert all(k in self.values for k in keys)


def _beats(world_size: int, behind: int) -> dict[str, str]:
    """Heartbeats of a job whose ranks wait in collective #8 of group 2, but ``behind``."""
    beats = {}
    for rank in range(world_size):
        waiting = rank != behind
        beats[StallWatchdog._KEY.format(rank)] = json.dumps({
            "beat": 1, "step": 3, "what": "step", "since": 0.0, "at": f"loop.py:{rank}",
            "collectives": {"2": [8, 7] if waiting else [7, 7]},
            "pending": [{"pg": "2", "group": "DATA_PARALLEL_GROUP", "seq": 8,
                         "op": "nccl:all_reduce", "since": 0.0}] if waiting else []})
    return beats


@pytest.mark.parametrize("world_size", [2, 16, 256])
def test_one_rank_reports_with_a_few_store_calls_whatever_the_world_size(world_size):
    store = CountingStore({**_beats(world_size, behind=world_size - 1),
                           StallWatchdog._REPORTED: "1"})
    reporter = StallWatchdog(3.0, 0, world_size)
    reporter._sleep = lambda s: None
    own = json.loads(store.values[StallWatchdog._KEY.format(0)])
    lines = reporter._peer_report(store, own)
    assert store.calls <= 4, store.calls  # check + multi_get, twice: not 4 per peer
    assert f"holding up the job: rank {world_size - 1} has not entered collective #8 nccl:all_reduce " \
           f"(DATA_PARALLEL_GROUP)" in lines[-1]
    assert f"its main thread is at loop.py:{world_size - 1}" in lines[-1]
    assert sum(line.startswith("rank ") for line in lines) == world_size - 1

    store.calls = 0
    other = StallWatchdog(3.0, 1, world_size, connect_store=lambda timeout_s: store)
    assert other._await_report(store) == "rank 0's log names the ranks that stalled"
    assert store.calls == 1  # one wait for rank 0's report, no heartbeat read


def test_a_rank_whose_store_does_not_answer_does_not_wait_for_the_report():
    """Rank 0 stopped: it hosts the store, so its report cannot come. A waiting rank's new client
    gets no answer to its handshake (a TCPStore client's constructor to a stopped server hangs
    past its timeout), and the rank says so after the store timeout instead of waiting report_s
    (9 s here; 25 s at a 15 s stall timeout, which held the elastic agent's restart past 60 s).
    The heartbeats cannot tell: a TCPStore set is not answered, it goes into the socket buffer."""
    stopped = threading.Event()

    def connect(timeout_s):
        stopped.wait()  # never returns while the test runs
        raise AssertionError("unreachable")

    other = StallWatchdog(3.0, 1, 2, connect_store=connect)
    began = time.monotonic()
    said = other._await_report(CountingStore({}))
    took = time.monotonic() - began
    stopped.set()
    assert took < other._store_timeout_s + 2 < other.report_s, (took, said)
    assert re.fullmatch(r"the rendezvous store \(hosted by rank 0's process\) does not answer: "
                        r"rank 0 is stalled, or its machine is unreachable \(a new client had no "
                        r"answer within 2 s; no report can come from it\)", said), said


def test_the_ranks_the_others_wait_for_are_named_from_the_collective_sequence_numbers():
    beats = {rank: json.loads(text) for rank, text in enumerate(_beats(4, behind=2).values())}
    (line,) = holding_up(beats)
    assert line.startswith("holding up the job: rank 2 has not entered collective #8 nccl:all_reduce "
                           "(DATA_PARALLEL_GROUP) that ranks 0-1, 3 wait in (its last: #7)")
    for beat in beats.values():  # every rank has finished #8: nobody waits, nobody is named
        beat["collectives"]["2"] = [8, 8]
    assert holding_up(beats) == []


def test_the_flight_recorder_env_is_set_for_nccl_and_a_users_value_is_kept(tmp_path, monkeypatch, caplog):
    import logging

    from megatron_tinyllama.parallel import init

    assert init.collective_env(str(tmp_path), nccl=True) == {
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(tmp_path / "flight_recorder" / "rank_"),
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    assert init.collective_env(None, nccl=False) == {}
    monkeypatch.setenv("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "/scratch/fr_")
    with caplog.at_level(logging.WARNING, logger=init.__name__):
        init.set_collective_env(str(tmp_path))
    assert init.flight_recorder_prefix() == "/scratch/fr_"
    assert (f"TORCH_NCCL_DEBUG_INFO_TEMP_FILE=/scratch/fr_ from the environment kept (this run would "
            f"set {tmp_path / 'flight_recorder' / 'rank_'})") in caplog.text


def test_a_rank_under_the_pipeline_stops_when_the_pipeline_alone_is_killed(tmp_path):
    """The chain tinyllama-pipeline -> deepspeed runner -> deepspeed.launcher.launch -> rank, with
    stand-ins whose command lines are those the rank recognises: SIGKILL of the pipeline's PID
    alone (its children live on) is seen by the rank as a stop request naming the pipeline."""
    import os
    import signal

    rank = ("import sys, time\n"
            "from megatron_tinyllama.train.watchdog import LauncherWatch\n"
            "watch = LauncherWatch(poll_s=0.05).start()\n"
            "print('watching:', '; '.join(name for _, name in watch.watched), flush=True)\n"
            "deadline = time.monotonic() + 20\n"
            "while watch.reason is None and time.monotonic() < deadline:\n"
            "    time.sleep(0.05)\n"
            "print('reason:', watch.reason, flush=True)\n")
    out = tmp_path / "rank.out"

    def stand_in(path, child_args):
        """A script that starts its child (stdout to rank.out) and waits for it."""
        path.write_text("import subprocess, sys\n"
                        f"out = open({str(out)!r}, 'a')\n"
                        f"sys.exit(subprocess.call({child_args!r}, stdout=out))\n")
        return path

    launch = stand_in(tmp_path / "launch.py", [sys.executable, "-c", rank])
    runner = stand_in(tmp_path / "deepspeed", [sys.executable, str(launch), "deepspeed.launcher.launch"])
    pipeline = stand_in(tmp_path / "tinyllama-pipeline", [sys.executable, str(runner)])
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    head = subprocess.Popen([sys.executable, str(pipeline), "--variant", "general"], env=env)
    try:
        deadline = time.monotonic() + 20
        while "watching:" not in (out.read_text() if out.exists() else ""):
            assert time.monotonic() < deadline and head.poll() is None, "the rank did not start"
            time.sleep(0.05)
        head.send_signal(signal.SIGKILL)  # the pipeline's PID alone, not its group
        head.wait()
        while "reason:" not in out.read_text():
            assert time.monotonic() < deadline + 20, out.read_text()
            time.sleep(0.05)
    finally:
        head.kill()
    text = out.read_text()
    assert ("watching: deepspeed's per-node launcher (deepspeed.launcher.launch); the deepspeed "
            "launcher; tinyllama-pipeline") in text
    assert f"reason: tinyllama-pipeline (pid {head.pid}) exited" in text


def test_a_stop_says_which_rank_asked_and_why():
    """What travels in the step's all-reduce when one rank asks to stop: its reason as a code, so
    the others can say 'a stop request from rank 3 (node 1): its launcher is gone' (before: 'a
    stop request on another rank', for a node whose launcher had died)."""
    from types import SimpleNamespace

    from megatron_tinyllama.train.loop import STOP_KINDS, StopRequest, stop_kind

    assert stop_kind(None) == 0 and stop_kind(StopRequest()) == 0
    gone = StopRequest(launcher=SimpleNamespace(reason="the deepspeed launcher (pid 7) exited"))
    assert STOP_KINDS[stop_kind(gone)] == "its launcher is gone"
    timed = StopRequest(stop_after_minutes=1e-9)
    assert STOP_KINDS[stop_kind(timed)] == "the time limit (train.stop_after_minutes)"
    signalled = StopRequest()
    signalled.reason = "signal SIGTERM"
    assert STOP_KINDS[stop_kind(signalled)] == "a signal"
