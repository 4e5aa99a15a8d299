"""Imported once by the forkserver that starts test ranks: what every rank would import anyway.

A spawned rank paid ~10 s of CPU importing torch, deepspeed, megatron-core and this package
before it did anything; the suite starts a few hundred ranks on two cores. Ranks forked from a
server that imported these once start in a fraction of a second. Only imports happen here: no
tensor op runs, so no OpenMP pool exists to be broken by the fork.
"""

import os

# deepspeed picks its accelerator when first asked; test ranks are CPU ranks (as _entry sets too).
os.environ["DS_ACCELERATOR"] = "cpu"

import deepspeed  # noqa: E402,F401
import megatron.core.parallel_state  # noqa: E402,F401
import megatron.core.tensor_parallel  # noqa: E402,F401
import torch  # noqa: E402,F401
import torch.distributed  # noqa: E402,F401

import megatron_tinyllama.engine.engine  # noqa: E402,F401
import megatron_tinyllama.parallel.cpu_shim  # noqa: E402,F401
import megatron_tinyllama.train.loop  # noqa: E402,F401
