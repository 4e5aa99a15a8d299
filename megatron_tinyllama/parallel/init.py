"""Process groups and seeds: the one place that reads the launcher's environment.

The ``deepspeed`` launcher (like torchrun) describes each process through environment variables
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE/LOCAL_SIZE, MASTER_ADDR, MASTER_PORT). We read them
here once into a :class:`DistributedEnv`; everything else receives that object or the config.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_tinyllama.config import ConfigError

logger = logging.getLogger(__name__)

# Offsets as in megatron-core's model_parallel_cuda_manual_seed, so that a TP rank's stream is the
# same whichever of our entry points seeded it.
_TP_SEED_OFFSET = 2718


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in the job, as the launcher told it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def node_of(self, rank: int) -> int:
        """The node of ``rank`` (launchers number ranks node by node, local_world_size each)."""
        return rank // max(1, self.local_world_size)


def read_launcher_env() -> DistributedEnv:
    """Read rank and sizes from the launcher's environment (single process when absent)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", str(world))))
    return DistributedEnv(
        rank=int(env.get("RANK", "0")),
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=local_world,
    )


def check_launched_world(parallel_cfg) -> DistributedEnv:
    """The launcher's world, refused when it is not ``parallel.expected_world_size`` or has more
    local ranks than visible GPUs (:func:`check_local_devices`).

    Made on every rank before any collective, so all of them stop alike.

    Args:
        parallel_cfg: The recipe's :class:`~megatron_tinyllama.config.ParallelConfig`.

    Raises:
        ConfigError: Naming both sizes and what usually causes the difference.
    """
    env = read_launcher_env()
    check_local_devices(env)
    expected = parallel_cfg.expected_world_size
    if expected is not None and env.world_size != expected:
        nodes = f"{env.num_nodes} node{'s' if env.num_nodes > 1 else ''} of " \
                f"{env.local_world_size}"
        raise ConfigError(
            f"the launcher started {env.world_size} rank{'s' if env.world_size > 1 else ''} "
            f"({nodes}) but parallel.expected_world_size={expected}: check deepspeed's "
            f"--hostfile (a missing one makes it run on this machine's devices alone, with only "
            f"a warning), --num_nodes, --num_gpus and --include/--exclude")
    return env


def visible_gpus() -> int:
    """GPUs this process can use (``torch.cuda.device_count()``, after ``CUDA_VISIBLE_DEVICES``);
    0 without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_local_devices(env: DistributedEnv) -> None:
    """Refuse more local ranks than visible GPUs, before any CUDA call.

    deepspeed's runner never compares a hostfile's ``slots`` with the GPUs: with ``slots=2`` on a
    one-GPU machine it starts two ranks (``CUDA_VISIBLE_DEVICES=0,1``, of which only 0 exists),
    and rank 1's ``torch.cuda.set_device(1)`` fails with "invalid device ordinal". Every rank
    makes this check from its own environment, so all of them stop alike. Without CUDA (gloo on
    CPU) any number of ranks may share the machine.

    Raises:
        ConfigError: naming the local ranks and the visible GPUs.
    """
    if not torch.cuda.is_available():
        return
    gpus = visible_gpus()
    ranks = max(env.local_world_size, env.local_rank + 1)
    if ranks > gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(
            f"the launcher started {ranks} local rank{'s' if ranks > 1 else ''} on this node but "
            f"{gpus} GPU{'s are' if gpus != 1 else ' is'} visible"
            + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
            + f": one rank per GPU; give the hostfile slots={gpus} (or deepspeed --num_gpus {gpus})")


def connect_rendezvous_store(timeout_s: float):
    """A new client of the job's rendezvous store (the TCP store at MASTER_ADDR:MASTER_PORT that
    torch.distributed started on rank 0), with its own ``timeout_s``: the default group's client
    waits as long as the process-group timeout. None when the launcher gave no address."""
    import datetime

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    return dist.TCPStore(addr, int(port), is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def set_thread_env_defaults(num_threads: int | None = None) -> None:
    """On CPU, several ranks share the cores: default OMP_NUM_THREADS to cores/local ranks."""
    if torch.cuda.is_available():
        return
    launcher = read_launcher_env()
    wanted = num_threads or max(1, (os.cpu_count() or 1) // max(1, launcher.local_world_size))
    current = os.environ.get("OMP_NUM_THREADS")
    if current is not None and int(current) != wanted:
        logger.info("OMP_NUM_THREADS=%s from the environment kept (default would be %d)", current, wanted)
        wanted = int(current)
    torch.set_num_threads(wanted)


FLIGHT_RECORDER_DIR = "flight_recorder"
"""Folder of ``checkpoint.save_dir`` that receives each rank's flight-recorder dump on a stall."""

_FLIGHT_RECORDER_ENTRIES = 2000  # PyTorch's own default; the last collectives of every group


def collective_env(save_dir: str | None, nccl: bool) -> dict[str, str]:
    """The environment PyTorch's flight recorder needs for this run (pure, for tests).

    The flight recorder keeps, per rank, the last collectives of every process group with their
    sequence numbers; a stall report reads it (see :mod:`megatron_tinyllama.train.watchdog`) and
    each rank's dump (``<save_dir>/flight_recorder/rank_<r>``, the format of PyTorch's
    ``torchfrtrace`` analyser) shows which collective each rank was in. On NCCL the communicator's
    own watchdog also dumps there at the process-group timeout (``TORCH_NCCL_DUMP_ON_TIMEOUT``).
    """
    env: dict[str, str] = {}
    if save_dir:
        env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = str(Path(save_dir) / FLIGHT_RECORDER_DIR / "rank_")
    if nccl:
        env["TORCH_NCCL_TRACE_BUFFER_SIZE"] = str(_FLIGHT_RECORDER_ENTRIES)
        env["TORCH_NCCL_DUMP_ON_TIMEOUT"] = "1"
    return env


def set_collective_env(save_dir: str | None) -> None:
    """Set :func:`collective_env` before the process group starts (NCCL reads it then).

    A variable the user set to another value is kept, with a warning naming both.
    """
    for name, value in collective_env(save_dir, torch.cuda.is_available()).items():
        current = os.environ.get(name)
        if current is not None and current != value:
            logger.warning("%s=%s from the environment kept (this run would set %s)", name, current,
                           value)
            continue
        os.environ[name] = value


def flight_recorder_prefix() -> str | None:
    """Where this rank's flight-recorder dump goes (``<prefix><rank>``), or None when unset."""
    return os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE") or None


def set_process_group_timeouts(timeout_s: float) -> int:
    """Set the timeout of every process group this rank belongs to (the default one, megatron-core's
    and DeepSpeed's); returns how many were set.

    ``train.stall_timeout_minutes`` decides it (through the stall watchdog) instead of the fixed
    30 minutes of :func:`initialize_distributed`: a collective that never completes then ends the
    rank (on NCCL with the flight-recorder dump) soon after the watchdog's report, not half an hour
    later. Set after the groups exist, as torchtitan sets its training timeout after the first
    step; ``_set_pg_timeout`` and the group registry are PyTorch internals (2.4-2.13), so a
    failure is logged and the groups keep their timeout.
    """
    import datetime

    from torch.distributed import distributed_c10d as c10d

    if not dist.is_initialized():
        return 0
    timeout = datetime.timedelta(seconds=timeout_s)
    done = 0
    try:
        groups = list(c10d._world.pg_map)
    except Exception as err:  # noqa: BLE001 (a PyTorch internal)
        logger.warning("process-group timeouts left as they are: %s", err)
        return 0
    for group in groups:
        try:
            c10d._set_pg_timeout(timeout, group)
            done += 1
        except Exception as err:  # noqa: BLE001 (not a member, or a backend without timeouts)
            logger.debug("process group %s keeps its timeout: %s", group, err)
    return done


def initialize_distributed(timeout_minutes: int = 30) -> DistributedEnv:
    """Start torch.distributed (NCCL on GPU, gloo on CPU) through DeepSpeed, once per process."""
    import datetime

    import deepspeed

    env = read_launcher_env()
    if torch.cuda.is_available():
        check_local_devices(env)  # a clear error instead of "invalid device ordinal"
        torch.cuda.set_device(env.local_rank)
    else:
        # DeepSpeed's CPU accelerator otherwise JIT-compiles a shared-memory all-reduce op (~65 s,
        # needs g++) at init; gloo is all we need for correctness on CPU.
        import deepspeed.ops

        compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False
    # Called even when torch.distributed is already up (tests, other launchers): DeepSpeed keeps
    # its own communication backend handle, and without it its config silently assumes 1 rank.
    with named_port_in_use():
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return env


@contextlib.contextmanager
def named_port_in_use():
    """Turn torch's ``DistNetworkError ... EADDRINUSE`` (rank 0 cannot host the rendezvous store on
    MASTER_PORT) into a :class:`ConfigError` naming the port and how to pick another: one line
    instead of a traceback, exit 2 through the entry point.
    """
    from megatron_tinyllama.launch import port_in_use_message

    try:
        yield
    except dist.DistNetworkError as err:
        if "EADDRINUSE" not in str(err) and "address already in use" not in str(err).lower():
            raise
        host = os.environ.get("MASTER_ADDR") or "this machine"
        raise ConfigError(port_in_use_message(os.environ.get("MASTER_PORT", "?"), host)) from None


def initialize_model_parallel(tensor_parallel_size: int, seed: int) -> None:
    """Create megatron-core's TP/DP groups (TP ranks consecutive) and seed every RNG stream.

    Raises:
        ConfigError: when the world size is not a multiple of the TP degree.
    """
    from megatron.core import parallel_state, tensor_parallel

    from megatron_tinyllama.parallel.cpu_shim import require_cpu_shim

    world = dist.get_world_size()
    if world % tensor_parallel_size:
        raise ConfigError(
            f"parallel.tensor_parallel_size={tensor_parallel_size} does not divide the "
            f"world size {world}"
        )
    require_cpu_shim()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        # megatron-core's gloo twins of the DP groups serve only its own distributed optimizer
        # and checkpoint code, which this stack does not use (DeepSpeed optimises, over the
        # default groups). On GPU they would be idle gloo sockets, a known cause of multi-node
        # hangs when gloo picks the wrong interface; on CPU the default groups are gloo already.
        create_gloo_process_groups=False,
    )
    set_seed(seed)


def node_local_groups(world_size: int, tensor_parallel_size: int, block_size: int) -> list[list[int]]:
    """Every node-local parameter-partition group: within each block of ``block_size``
    consecutive ranks (a node), the ranks of one TP rank.

    megatron-core puts the ranks of a TP group next to each other, so rank ``r`` is TP rank
    ``r % tp`` and the data-parallel group of TP rank ``t`` is ``{r : r % tp == t}``. A group
    must stay inside one TP rank's data-parallel group: ranks holding different TP shards cannot
    share a parameter partition (DeepSpeed's own hpZ groups, consecutive ranks, would mix them).

    Raises:
        ConfigError: the block does not hold whole TP groups or does not divide the world.
    """
    if block_size % tensor_parallel_size or world_size % block_size:
        raise ConfigError(
            f"node-local sharding over blocks of {block_size} ranks needs a multiple of "
            f"parallel.tensor_parallel_size={tensor_parallel_size} that divides the world size "
            f"{world_size}")
    return [[r for r in range(start, start + block_size) if r % tensor_parallel_size == t]
            for start in range(0, world_size, block_size) for t in range(tensor_parallel_size)]


def initialize_node_local_group(tensor_parallel_size: int, block_size: int):
    """Create all node-local partition groups (collective) and return this rank's.

    The group is also installed as DeepSpeed's ZeRO++ intra-node parameter group
    (``deepspeed.utils.groups._ZERO_PARAM_INTRA_PARALLEL_GROUP``): ``zero.Init`` accepts it as an
    argument, but its partitioning code and the ZeRO-3 optimizer read that module variable
    (DeepSpeed 0.16-0.19). It is the one private DeepSpeed name this stack sets.
    """
    from deepspeed.utils import groups as ds_groups

    mine = None
    for ranks in node_local_groups(dist.get_world_size(), tensor_parallel_size, block_size):
        group = dist.new_group(ranks)  # every rank creates every group, in the same order
        if dist.get_rank() in ranks:
            mine = group
    ds_groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = mine
    return mine


def set_seed(seed: int) -> None:
    """Seed torch's default RNG identically on every rank (so CPU-initialised weights agree across
    TP layouts) and the tracked model-parallel stream per TP rank (dropout inside TP regions)."""
    from megatron.core import parallel_state, tensor_parallel

    torch.manual_seed(seed)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tracker = tensor_parallel.get_cuda_rng_tracker()
        tracker.reset()
        tracker.add("model-parallel-rng", seed + _TP_SEED_OFFSET + tp_rank)


def shutdown_distributed(wait_for_peers: bool = True) -> None:
    """Tear down megatron-core's groups and the default process group, then flush output.

    ``wait_for_peers`` adds a barrier first so no rank destroys a group a peer still uses; pass
    False after an error, when a peer may never reach the barrier. Teardown failures are logged,
    never raised: they must not mask the result of the work that came before.
    """
    import sys

    try:
        from megatron.core import parallel_state

        if wait_for_peers and dist.is_initialized():
            dist.barrier()
        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as err:  # noqa: BLE001
        logger.warning("teardown: %s", err)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()


def exit_process(code: int) -> None:
    """End this process now, skipping interpreter teardown.

    DeepSpeed/gloo background threads sometimes abort a process at interpreter exit ("terminate
    called without an active exception", about one run in six on CPU), turning finished work into
    a SIGABRT. Call this only after :func:`shutdown_distributed` has flushed everything.
    """
    os._exit(code)
