"""What ``pip install`` gives a user: the wheel carries the released testbed and the published loss
curves with their licences, and ``tinyllama-scaling reproduce`` and ``forecast-published`` run
from it with no path, far from any checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTBED_DATA = REPO_ROOT / "megatron_tinyllama" / "scaling" / "testbed_data"
CURVES_DATA = REPO_ROOT / "megatron_tinyllama" / "scaling" / "curves_data"

pytestmark = pytest.mark.slow


def test_wheel_ships_the_testbed_and_reproduce_runs_from_it(tmp_path):
    # Build from a copy of what setuptools reads, so the checkout gets no build/ or egg-info.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    for name in ("megatron_tinyllama", "ds_configs", "examples"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-cache-dir", "-q", str(src), "-w", str(tmp_path / "wheel")],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("megatron_tinyllama-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO_ROOT).as_posix() for p in TESTBED_DATA.rglob("*") if p.is_file()}
    assert len(shipped) == 213  # 104 models, 104 evals, 3 tables, LICENSE.txt, PROVENANCE.md
    assert not shipped - names, sorted(shipped - names)[:5]
    curves = {p.relative_to(REPO_ROOT).as_posix() for p in CURVES_DATA.rglob("*") if p.is_file()}
    assert len(curves) == 29  # 3 sizes x 9 schedules, LICENSE.txt, PROVENANCE.md
    assert not curves - names, sorted(curves - names)[:5]
    resources = {f"megatron_tinyllama/resources/{p.relative_to(REPO_ROOT).as_posix()}"
                 for folder in ("ds_configs", "examples") for p in (REPO_ROOT / folder).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    assert not resources - names, sorted(resources - names)[:5]  # recipes and DeepSpeed configs

    # Unpacked as pip would install it, imported from there, run in an empty directory.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, megatron_tinyllama.scaling.cli as c; "
         "print(c.__file__, file=sys.stderr); sys.exit(c.main(['reproduce', '--datasets', 'rpj']))"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[0].startswith(str(site))  # the wheel's code, not the checkout
    assert "rpj-open_lm_1b-32.0" in proc.stdout and "rpj-open_lm_7b-1.0" in proc.stdout
    assert list(empty.iterdir()) == []
    # The published loss curves, read from the wheel: the forecast's check needs no path either.
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, megatron_tinyllama.scaling.cli as c; "
         "sys.exit(c.main(['forecast-published', '--sizes', '25']))"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wsdld_20000_24000" in proc.stdout and list(empty.iterdir()) == []

    # The trainer's DeepSpeed configs and the recipes are found in the installed package too.
    proc = subprocess.run(
        [sys.executable, "-c", "from megatron_tinyllama.engine.ds_config import load_base_ds_config as l; "
         "from megatron_tinyllama.pipeline import REPO_V1_1, stage_recipes; "
         "print(l(None, 'zero3_node_local.json')['zero_optimization']['stage'], "
         "len(stage_recipes(REPO_V1_1, 'math_code')), REPO_V1_1)"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage, count, where = proc.stdout.split()
    assert (stage, count) == ("3", "3") and where.startswith(str(site))
