"""Run a function on N gloo ranks in spawned processes (CPU), failing loudly if any rank fails."""

from __future__ import annotations

import os

import torch.multiprocessing as mp

from megatron_tinyllama.launch import free_port


def _entry(rank: int, world_size: int, port: int, ranks_per_node: int, fn, args) -> None:
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
    mp.spawn(_entry, args=(world_size, free_port(), per_node, fn, args), nprocs=world_size, join=True)


def start_ranks(fn, world_size: int, *args) -> list:
    """Start ``fn`` on ``world_size`` gloo ranks as :func:`run_on_ranks` does, without waiting:
    for tests that watch the processes themselves (exit codes, a stopped rank)."""
    context = mp.get_context("spawn")
    port = free_port()
    procs = [context.Process(target=_entry, args=(rank, world_size, port, world_size, fn, args))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    return procs
