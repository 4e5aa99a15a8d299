"""Convert a megatron-tinyllama checkpoint (any TP degree) to a Hugging Face Llama directory."""

import sys

from megatron_tinyllama.checkpoint.convert import main_to_hf

if __name__ == "__main__":
    sys.exit(main_to_hf())
