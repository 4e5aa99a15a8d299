"""Concatenate Megatron indexed datasets into one (see megatron_tinyllama.data.merge)."""

import sys

from megatron_tinyllama.data.merge import main

if __name__ == "__main__":
    sys.exit(main())
