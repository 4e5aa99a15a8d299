"""Pretraining entry point, started on every rank by the ``deepspeed`` launcher (fixed size) or by
torchrun's elastic agent (a run that goes on when a node is lost; see the README and
:mod:`megatron_tinyllama.elastic`).

    deepspeed --hostfile hostfile --module megatron_tinyllama.train.pretrain --config recipe.yaml \
        parallel.expected_world_size=16 train.micro_batch_size=4 checkpoint.save_dir=runs/v1

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=1:2 --nproc-per-node=8 \
        --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 --rdzv-id=v1 --max-restarts=100 \
        -m megatron_tinyllama.train.pretrain --config recipe.yaml checkpoint.save_dir=runs/v1

Overrides are ``section.field=value`` (also accepted as ``--override section.field=value``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Optional, Sequence

from megatron_tinyllama.config import ConfigError, load_config
from megatron_tinyllama.console import hide_known_noise


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # DeepSpeed and megatron-core are chatty at INFO; their warnings still show, except the
    # known ones that say nothing about this job (TINYLLAMA_VERBOSE=1 shows those too).
    for name in ("DeepSpeed", "deepspeed", "megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)
    hide_known_noise()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Pretrain a TinyLlama-class model (megatron-core + DeepSpeed).")
    parser.add_argument("--config", required=True, help="recipe YAML/JSON (see examples/)")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK is read instead")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    from megatron_tinyllama.parallel.init import (check_launched_world, set_collective_env,
                                                  set_thread_env_defaults, shutdown_distributed)
    from megatron_tinyllama.elastic import ElasticEnvError, read_elastic_env, setup_problems

    try:
        cfg = load_config(args.config, list(args.override) + list(args.overrides))
        elastic = read_elastic_env()
        # Under the elastic agent the world is whatever the rendezvous formed: a fixed size
        # would refuse the very restarts the agent is there for.
        check_launched_world(cfg.parallel if elastic is None
                             else dataclasses.replace(cfg.parallel, expected_world_size=None))
    except (ConfigError, ElasticEnvError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if elastic is not None and int(os.environ.get("RANK", "0")) == 0:
        for problem in setup_problems(elastic, cfg.checkpoint.save_dir):
            logging.getLogger(__name__).warning("elastic run: %s", problem)
    from megatron_tinyllama.checkpoint.hf import ConversionError
    from megatron_tinyllama.checkpoint.native import CheckpointWriteError
    from megatron_tinyllama.checkpoint.training import CheckpointError
    from megatron_tinyllama.checkpoint.weights import ReplicaDriftError
    from megatron_tinyllama.parallel.cpu_shim import cpu_shim
    from megatron_tinyllama.train.loop import NonFiniteLossError, train
    from megatron_tinyllama.train.watchdog import LauncherWatch

    set_thread_env_defaults()
    set_collective_env(cfg.checkpoint.save_dir)  # before the process group: NCCL reads it then
    # Signals go to the launcher, not to us: when it is gone, stop as on SIGTERM (see watchdog).
    stall = cfg.train.stall_timeout_minutes
    launcher = LauncherWatch(grace_s=stall and 60 * stall).start()
    code, clean = 0, False
    try:
        with cpu_shim():  # megatron-core's CUDA-only calls get CPU stand-ins (no-op with CUDA)
            result = train(cfg, launcher_watch=launcher)
        clean = True
        if result.stopped:  # a checkpoint was saved; a scheduler sees the run is not finished
            code = 3
    except (ConfigError, NonFiniteLossError, CheckpointError, ReplicaDriftError) as err:
        # Decided on every rank alike (from the same files, or after a collective), so the peers
        # are at the same point and can meet at the teardown barrier.
        logging.getLogger(__name__).error("%s", err)
        code, clean = 2, True
    except ConversionError as err:  # a rank's own weights file: its peers may be elsewhere
        logging.getLogger(__name__).error("%s", err)
        code = 2
    except CheckpointWriteError as err:  # this rank's file; the launcher stops the peers
        logging.getLogger(__name__).error("saving the checkpoint failed: %s; 'latest' and the "
                                          "earlier checkpoints are intact, the same command "
                                          "resumes from them", err)
        code = 1
    finally:
        shutdown_distributed(wait_for_peers=clean)
    return code


def cli() -> None:
    """Console-script entry: like ``main``, but ends without interpreter teardown (see
    :func:`~megatron_tinyllama.parallel.init.exit_process`)."""
    from megatron_tinyllama.parallel.init import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
