"""The rank-side watches of train/watchdog.py on real processes (the launcher end to end is in
tests/integration/test_launcher.py, a stopped rank in tests/distributed/test_process_faults.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from megatron_tinyllama.train.loop import StopRequest
from megatron_tinyllama.train.watchdog import LauncherWatch, _is_deepspeed_launch, _is_deepspeed_runner


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
