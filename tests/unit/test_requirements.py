"""The install requirements pick a megatron-core that imports on the installing machine."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from packaging.requirements import Requirement

SETUP = Path(__file__).resolve().parents[2] / "setup.py"


def _mcore_requirements() -> list[Requirement]:
    tree = ast.parse(SETUP.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MCORE_REQUIREMENTS" for t in node.targets):
            return [Requirement(text) for text in ast.literal_eval(node.value)]
    raise AssertionError(f"{SETUP}: no MCORE_REQUIREMENTS list")


def _active(python: str, platform: str) -> dict[str, Requirement]:
    env = {"python_version": python, "python_full_version": python + ".0", "sys_platform": platform}
    active = [r for r in _mcore_requirements() if r.marker is None or r.marker.evaluate(env)]
    names = [r.name for r in active]
    assert len(names) == len(set(names)), f"two requirements of one package for {env}: {names}"
    return {r.name: r for r in active}


@pytest.mark.parametrize("python,platform", [("3.11", "linux"), ("3.12", "linux"), ("3.13", "linux"),
                                             ("3.12", "darwin"), ("3.11", "darwin")])
def test_every_allowed_megatron_core_imports_where_it_is_installed(python, platform):
    """megatron-core 0.18 and 0.19 import triton at `import megatron.core` (their paged_stash op),
    and a CPU torch brings no triton: a machine that may get them must get triton too."""
    active = _active(python, platform)
    allowed = active["megatron-core"].specifier
    assert "0.16.1" in allowed  # the version CI and the tests run
    needs_triton = any(v in allowed for v in ("0.18.0", "0.19.2"))
    if needs_triton:
        assert "triton" in active, f"Python {python} on {platform} may get megatron-core 0.18+ without triton"
    if python == "3.11":  # megatron-core 0.17+ requires Python 3.12
        assert "0.17.0" not in allowed
    if python >= "3.12" and platform == "linux":
        assert "0.19.2" in allowed  # the newest tested (on an H200, Python 3.12)
