"""The suite compiles into its own inductor cache, never the machine-wide one (see conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _inductor_cache_dir_in_subprocess() -> Path:
    code = ("from torch._inductor.runtime.cache_dir_utils import cache_dir; print(cache_dir())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def test_compiles_go_to_a_per_session_cache_that_spawned_ranks_inherit():
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    session_cache = Path(cache_dir())
    assert session_cache != Path(default_cache_dir())
    assert session_cache.name == "inductor"
    assert session_cache.parent.name.startswith("tinyllama-test-inductor-")
    assert session_cache.parent.parent == Path(tempfile.gettempdir())
    # A rank started by a test (launcher or spawn) inherits the environment, so the same folder.
    assert _inductor_cache_dir_in_subprocess() == session_cache
    assert os.environ["TRITON_CACHE_DIR"].startswith(str(session_cache.parent))
