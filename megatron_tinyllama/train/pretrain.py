"""Pretraining entry point, started by the ``deepspeed`` launcher on every rank.

    deepspeed --hostfile hostfile -m megatron_tinyllama.train.pretrain --config recipe.yaml \
        train.micro_batch_size=4 checkpoint.save_dir=runs/v1

Overrides are ``section.field=value`` (also accepted as ``--override section.field=value``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from megatron_tinyllama.config import ConfigError, load_config


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # DeepSpeed and megatron-core are chatty at INFO; their warnings still show.
    for name in ("DeepSpeed", "deepspeed", "megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)


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
    try:
        cfg = load_config(args.config, list(args.override) + list(args.overrides))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from megatron_tinyllama.parallel.init import set_thread_env_defaults
    from megatron_tinyllama.train.loop import NonFiniteLossError, train

    set_thread_env_defaults()
    code = 0
    try:
        train(cfg)
    except (ConfigError, NonFiniteLossError) as err:
        logging.getLogger(__name__).error("%s", err)
        code = 2
    finally:
        _shutdown()
    return code


def _shutdown() -> None:
    """Tear down process groups while every rank is alive, then flush."""
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state

        if dist.is_initialized():
            dist.barrier()
        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as err:  # noqa: BLE001 - teardown must not mask the training result
        logging.getLogger(__name__).warning("teardown: %s", err)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()


def cli() -> None:
    """Console-script entry: like ``main`` but ends the process without interpreter teardown.

    DeepSpeed/gloo background threads sometimes abort a process at interpreter exit ("terminate
    called without an active exception", about one run in six on CPU), turning a finished run
    into a failure; everything has been flushed and torn down by then.
    """
    os._exit(main())


if __name__ == "__main__":
    cli()
