#!/usr/bin/env python
"""The paper's downstream evaluation (lm-evaluation-harness), the same as ``tinyllama-eval``.

Example: ``python tools/evaluate.py --model runs/tinyllama-v1.1/stage3-math_code --dry-run``
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_tinyllama.evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
