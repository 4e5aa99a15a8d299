"""Known third-party noise is hidden, anything else still shows, and TINYLLAMA_VERBOSE shows all."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from megatron_tinyllama.console import NoiseFilter

# Lines as the deepspeed launcher and two CPU ranks print them (from a demo run's log).
LAUNCH_OUTPUT = """\
[2026-11-26 12:24:59,714] [INFO] [launch.py:170:main] dist_world_size=2
/x/megatron/core/optimizer/__init__.py:24: UserWarning: Transformer Engine and Apex are not installed. Falling back to Torch optimizers.
  warnings.warn(
/x/torch/distributed/c10d_logger.py:83: FutureWarning: `torch.distributed.reduce_scatter_tensor` is deprecated. Please use `torch.distributed.reduce_scatter_single` instead.
  return func(*args, **kwargs)
/x/somewhere.py:7: UserWarning: something new and important
  warnings.warn("something new and important")
[rank0] 12:29:55 INFO megatron_tinyllama.model.attention: attention backend: sdpa
12:15:35 Using Megatron-FSDP without Transformer Engine.
[rank0] 12:30:24 INFO megatron_tinyllama.train.metrics: step 32 | loss 5.9647 | tokens 131,072
Traceback (most recent call last):
  File "/x/loop.py", line 3, in train
    return func(*args, **kwargs)
[2026-11-26 12:25:01,732] [ERROR] [launch.py:259:sigkill_handler] exits with return code = 1
"""


def test_line_filter_hides_exactly_the_known_noise():
    noise = NoiseFilter()
    kept = [line for line in LAUNCH_OUTPUT.splitlines() if not noise.is_noise(line)]
    assert kept == [
        "/x/somewhere.py:7: UserWarning: something new and important",
        '  warnings.warn("something new and important")',
        "[rank0] 12:29:55 INFO megatron_tinyllama.model.attention: attention backend: sdpa",
        "[rank0] 12:30:24 INFO megatron_tinyllama.train.metrics: step 32 | loss 5.9647 | tokens 131,072",
        "Traceback (most recent call last):",
        '  File "/x/loop.py", line 3, in train',
        "    return func(*args, **kwargs)",
        "[2026-11-26 12:25:01,732] [ERROR] [launch.py:259:sigkill_handler] exits with return code = 1",
    ]


_PROGRAM = textwrap.dedent("""
    import logging, warnings
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_tinyllama.console import hide_known_noise
    hide_known_noise()
    warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
    warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning)
    logging.getLogger("megatron_fsdp").info("Using Megatron-FSDP without Transformer Engine.")
    warnings.warn("an unknown warning")
    logging.getLogger("ours").info("our own line")
""")


@pytest.mark.parametrize("verbose", ["", "1"])
def test_known_warnings_and_log_records_are_silenced_at_the_source_unless_verbose(verbose):
    env = {"TINYLLAMA_VERBOSE": verbose, "PYTHONPATH": ":".join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stderr
    assert "an unknown warning" in out and "our own line" in out  # never hidden
    known = ("Transformer Engine and Apex", "all_gather_into_tensor", "Using Megatron-FSDP")
    assert all((k in out) == bool(verbose) for k in known), out
