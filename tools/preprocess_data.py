"""Tokenize jsonl[.zst] / parquet / text into Megatron indexed datasets (see megatron_tinyllama.data.preprocess)."""

import sys

from megatron_tinyllama.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
