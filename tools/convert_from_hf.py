"""Convert a Hugging Face Llama directory into a megatron-tinyllama checkpoint at a chosen TP degree."""

import sys

from megatron_tinyllama.checkpoint.convert import main_from_hf

if __name__ == "__main__":
    sys.exit(main_from_hf())
