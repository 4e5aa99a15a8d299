"""Run a function on N gloo ranks in new processes (CPU), failing loudly if any rank fails.

Ranks are forked from a forkserver that has imported the heavy libraries once
(:mod:`tests.distributed.rank_preload`), and each rank takes the environment of the test that
starts it, as a spawned process would: the same isolation as ``spawn`` without paying the imports
on every rank. ``TINYLLAMA_TEST_START_METHOD=spawn`` goes back to plain spawning.
"""

from __future__ import annotations

import multiprocessing
import os

import torch.multiprocessing as mp

from megatron_tinyllama.launch import free_port


class _ParentStream:
    """The starting process's stdout or stderr, handed to a rank as an inherited descriptor.

    A forkserver's children inherit the server's descriptors, not the test's: without this, what
    ranks print would miss pytest's ``capfd`` (tests read the ranks' error lines from it).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return _received_fd, (reduction.DupFd(self.fd),)  # only valid while a process is started


def _received_fd(dup) -> int:
    return dup.detach()


START_METHOD = os.environ.get("TINYLLAMA_TEST_START_METHOD", "forkserver")
_PRELOAD = ["tests.distributed.rank_preload"]


def process_context():
    """The multiprocessing context ranks start from (the forkserver preloads on its first use)."""
    context = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        context.set_forkserver_preload(_PRELOAD)
    return context


def _streams() -> tuple:
    return (_ParentStream(1), _ParentStream(2))


def _entry(rank: int, world_size: int, port: int, ranks_per_node: int, fn, args, environ=None,
           streams=()) -> None:
    if environ is not None:  # the starting test's environment, not the forkserver's
        os.environ.clear()
        os.environ.update(environ)
    for target, fd in enumerate(streams, start=1):  # the starting test's stdout and stderr
        os.dup2(fd, target)
        os.close(fd)
    import torch
    import torch.distributed as dist

    from megatron_tinyllama.parallel.cpu_shim import cpu_shim
    from megatron_tinyllama.parallel.init import exit_process, shutdown_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank % ranks_per_node),
                      LOCAL_WORLD_SIZE=str(ranks_per_node), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        with cpu_shim():  # as the training entry holds it for the whole run
            fn(rank, world_size, *args)
    except BaseException:
        # mp.spawn records the traceback for the parent; a peer may be stuck, so no barrier.
        shutdown_distributed(wait_for_peers=False)
        raise
    shutdown_distributed()
    # Same exit path as the real entry point: a clean finish must not turn into a SIGABRT at
    # interpreter exit, which is what made CI flaky.
    exit_process(0)


def run_on_ranks(fn, world_size: int, *args, ranks_per_node: int = 0) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes with a gloo group.

    ``ranks_per_node`` simulates nodes (LOCAL_RANK / LOCAL_WORLD_SIZE as a launcher would set
    them); 0 puts every rank on one node.
    """
    per_node = ranks_per_node or world_size
    process_context()
    for attempt in range(3):
        try:
            mp.start_processes(_entry, args=(world_size, free_port(), per_node, fn, args, dict(os.environ),
                                             _streams()),
                               nprocs=world_size, join=True, start_method=START_METHOD)
            return
        except mp.ProcessRaisedException as err:
            # The port free_port() found was taken before rank 0's store bound it (a client
            # connection of another test's ranks took it as its ephemeral port): nothing ran yet.
            if "EADDRINUSE" not in str(err) or attempt == 2:
                raise


def start_ranks(fn, world_size: int, *args) -> list:
    """Start ``fn`` on ``world_size`` gloo ranks as :func:`run_on_ranks` does, without waiting:
    for tests that watch the processes themselves (exit codes, a stopped rank)."""
    context = process_context()
    port = free_port()
    procs = [context.Process(target=_entry, args=(rank, world_size, port, world_size, fn, args, dict(os.environ),
                                                         _streams()))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    return procs
