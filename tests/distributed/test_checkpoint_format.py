"""Runs in flight keep going across the change of checkpoint format.

``tests/fixtures/checkpoint_v1`` was written by the code before per-rank checkpoints (DeepSpeed's
files + ``model/`` + ``optim/``; tests/fixtures/make_v1_checkpoint.py at c4cb44a): the first 3
steps of test_reshard's run at DP 2 (ZeRO-3). Resumed by today's code, at its own layout (through
DeepSpeed's files) and at another (through ``model/`` + ``optim/``), its next 3 steps and its
final weights must equal the independent reference trainer's 6 steps, as any resume does; the
checkpoints the resumed run writes are per-rank; and the converter still reads the old one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.distributed.test_reference_equivalence import assert_weights_match_reference, step_records
from tests.distributed.test_reshard import STEPS, Layout, _gaps, _log, _run, source  # noqa: F401

pytestmark = pytest.mark.distributed

FIXTURE = Path(__file__).parents[1] / "fixtures" / "checkpoint_v1"


def _resume_fixture(source, layout: Layout, name: str) -> Path:  # noqa: F811 - the fixture
    save_dir = source["tmp"] / name
    shutil.copytree(FIXTURE, save_dir)
    _run(save_dir, layout, STEPS, source["ours"])
    return save_dir


# The fixture ran ZeRO-3 at DP 2; each layout names its stage (what 'auto' picks may change).
@pytest.mark.parametrize("layout, change", [(Layout(2, zero_stage=3), None),
                                            (Layout(1, zero_stage=1), "DP 2 -> 1, ZeRO 3 -> 1")],
                         ids=["same-layout", "dp2-to-dp1"])
def test_a_checkpoint_of_the_previous_format_resumes_exactly(source, layout, change):  # noqa: F811
    before = {p: p.read_bytes() for p in FIXTURE.rglob("*") if p.is_file()}
    save_dir = _resume_fixture(source, layout, f"v1-{layout}")
    loss_gap, norm_gap = _gaps(save_dir, source["reference"])
    assert loss_gap <= 1e-5 and norm_gap <= 1e-5, (loss_gap, norm_gap)
    assert sorted(step_records(save_dir)) == list(range(1, STEPS + 1))
    log = _log(save_dir)
    assert "resumed from" in log and "global_step000003" in log
    if change is None:
        assert "on a new layout" not in log
    else:
        assert f"resuming step 3 on a new layout: {change} (optimizer state resharded)" in log
    new = json.loads((save_dir / "global_step000006" / "trainer_state.json").read_text())
    assert new["checkpoint_format"] == 2 and (save_dir / "global_step000006" / "state" / ".metadata").is_file()
    assert_weights_match_reference(save_dir, source["reference"], source["tmp"])  # via the converter's CLI
    assert {p: p.read_bytes() for p in FIXTURE.rglob("*") if p.is_file()} == before  # read, never written


def test_the_converter_still_reads_the_previous_format(tmp_path):
    from megatron_tinyllama.checkpoint.convert import main_to_hf, resolve_model_dir
    from megatron_tinyllama.checkpoint.native import load_model_checkpoint

    assert resolve_model_dir(FIXTURE) == FIXTURE / "global_step000003" / "model"
    assert main_to_hf(["--input", str(FIXTURE), "--output", str(tmp_path / "hf")]) == 0
    _, shards = load_model_checkpoint(FIXTURE / "global_step000003" / "model")
    from safetensors.torch import load_file

    exported = {}
    for file in (tmp_path / "hf").glob("*.safetensors"):
        exported.update(load_file(str(file)))
    norm = shards[0]["decoder.final_layernorm.weight"]
    assert exported["model.norm.weight"].float().equal(norm)
