"""Estimate a recipe's per-step ZeRO communication and tokens/s on a cluster shape."""

import sys

from megatron_tinyllama.parallel.comm_model import main

if __name__ == "__main__":
    sys.exit(main())
