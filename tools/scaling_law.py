#!/usr/bin/env python
"""Scaling-law toolkit (plan, fit, predict, reproduce, plot), the same as ``tinyllama-scaling``.

Example: ``python tools/scaling_law.py reproduce``
"""

import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout without installing

from megatron_tinyllama.scaling.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
