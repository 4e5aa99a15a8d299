"""Sample from a run's checkpoint, a model directory or an HF Llama directory (tinyllama-generate)."""

import sys

from megatron_tinyllama.generate import main

if __name__ == "__main__":
    sys.exit(main())
