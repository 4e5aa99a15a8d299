"""Check a deepspeed hostfile before launching (tinyllama-check-hostfile)."""

import sys

from megatron_tinyllama.launch import check_hostfile_main

if __name__ == "__main__":
    sys.exit(check_hostfile_main())
