"""ZeRO stages 1, 2 and 3 train the same model: against the independent reference trainer.

Each stage runs the reference-equivalence setup (converted transformers weights, 2 gloo ranks,
clipping that clips, accumulation, warm-up + cosine) and must give the reference trainer's losses
and gradient norms (fp32), write a checkpoint that resumes exactly and exports the reference's
weights, and in bf16 keep fp32 master weights and fp32 gradient accumulation (DeepSpeed's
BF16_Optimizer at ZeRO-1, its ZeRO optimizer at ZeRO-2).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.distributed.ranks import run_on_ranks
from tests.distributed.synthetic import synthetic_batches
from tests.distributed.test_reference_equivalence import (  # noqa: F401  (source is a fixture)
    SETTINGS,
    STEPS,
    assert_matches_reference,
    assert_weights_match_reference,
    recipe,
    reference_batches,
    source,
    step_records,
)
from tests.reference_trainer import train_reference

pytestmark = pytest.mark.distributed


def _worker(rank, world_size, tree, out):
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.train import loop

    seen = {}
    original = loop.build_engine

    def recording_build_engine(cfg, env):
        te = original(cfg, env)
        seen["te"] = te
        return te

    loop.build_engine = recording_build_engine
    loop.train(config_from_dict(tree), batch_source=synthetic_batches)
    optimizer = seen["te"].engine.optimizer
    info = {"optimizer": type(optimizer).__name__,
            "param_dtype": str(next(seen["te"].model.parameters()).dtype),
            "grad_accum_dtype": str(getattr(optimizer, "gradient_accumulation_dtype", None)
                                    or getattr(optimizer, "grad_acc_dtype", None))}
    masters = getattr(optimizer, "fp32_groups_flat_partition", None) \
        or getattr(optimizer, "single_partition_of_fp32_groups", None)
    info["master_dtype"] = str(masters[0].dtype) if masters else None
    if rank == 0:
        (Path(out) / f"{Path(tree['checkpoint']['save_dir']).name}.json").write_text(json.dumps(info))


def _run(tmp: Path, name: str, stage: int, **kwargs) -> Path:
    tree = recipe(tmp / name, **kwargs)
    tree["parallel"]["zero_stage"] = stage
    run_on_ranks(_worker, 2, tree, str(tmp))
    return tmp / name


def _resume_from_step_3(tmp: Path, name: str, stage: int, **kwargs) -> None:
    """Rerun from the step-3 checkpoint; steps 4 and 5 must repeat exactly."""
    save_dir = tmp / name
    first = step_records(save_dir)
    (save_dir / "latest").write_text("global_step000003")
    _run(tmp, name, stage, save_interval=3, **kwargs)
    resumed = step_records(save_dir)
    for step in (4, 5):
        assert resumed[step]["train_loss"] == first[step]["train_loss"], step
        assert resumed[step]["grad_norm"] == first[step]["grad_norm"], step


def test_zero2_matches_reference_resumes_exactly_and_exports(source):
    """fp32 ZeRO-2 (DeepSpeed's stage-1/2 optimizer with partitioned gradients)."""
    tmp = source["tmp"]
    save_dir = _run(tmp, "zero2", 2, init_from=source["converted"][1], save_interval=3)
    assert_matches_reference(save_dir, source["fp32"])
    assert_weights_match_reference(save_dir, source["fp32"], tmp)
    _resume_from_step_3(tmp, "zero2", 2, init_from=source["converted"][1])


def test_bf16_zero1_and_zero2_keep_fp32_master_and_accumulation_and_match_the_reference(source):
    """ZeRO-1 in bf16 is DeepSpeed's BF16_Optimizer (the 'auto' stage on one GPU): it must also
    checkpoint, resume exactly and export its fp32 master weights. Loss tolerance as for the
    ZeRO-3 bf16 test: 3 x |bf16 reference - fp32 reference|."""
    tmp = source["tmp"]
    bf16_ref = train_reference(source["hf"], reference_batches(), dataclasses.replace(SETTINGS, precision="bf16"))
    delta = max(abs(a - b) for a, b in zip(bf16_ref.losses, source["fp32"].losses))
    assert 0 < delta < 0.05
    expected_optimizer = {1: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer"}
    for stage in (1, 2):
        save_dir = _run(tmp, f"bf16_zero{stage}", stage, precision="bf16", init_from=source["converted"][1],
                        save_interval=3)
        records = step_records(save_dir)
        ours = [records[s]["train_loss"] for s in range(1, STEPS + 1)]
        gap = max(abs(a - b) for a, b in zip(ours, bf16_ref.losses))
        assert gap <= 3 * delta, (stage, gap, delta)
        assert ours != source["fp32"].losses
        info = json.loads((tmp / f"bf16_zero{stage}.json").read_text())
        assert info["optimizer"] == expected_optimizer[stage], info
        assert info["param_dtype"] == "torch.bfloat16" and info["master_dtype"] == "torch.float32", info
        assert info["grad_accum_dtype"] == "torch.float32", info
    # BF16_Optimizer's checkpoint: the export holds its fp32 master weights (the bf16 reference's,
    # to the rounding that separates the two bf16 runs) and a resume repeats steps 4 and 5.
    _compare_export(tmp / "bf16_zero1", bf16_ref, source["hf"], tmp)
    _resume_from_step_3(tmp, "bf16_zero1", 1, precision="bf16", init_from=source["converted"][1])


def _compare_export(save_dir: Path, reference, initial: Path, tmp: Path) -> None:
    """The export is the fp32 master copy and it tracked training: its distance to the bf16
    reference's weights is small next to how far training moved them. (Elementwise maxima are no
    test here: Adam turns bf16 noise in near-zero gradients into updates of up to ~lr.)"""
    from safetensors.torch import load_file

    from megatron_tinyllama.checkpoint.convert import main_to_hf

    out = tmp / f"{save_dir.name}_as_hf"
    assert main_to_hf(["--input", str(save_dir), "--output", str(out)]) == 0
    ours = load_file(str(out / "model.safetensors"))
    start = load_file(str(initial / "model.safetensors"))
    assert set(ours) == set(reference.state)
    moved = gap = 0.0
    representable = total = 0
    for name, tensor in reference.state.items():
        assert ours[name].dtype == torch.float32, name
        moved += (tensor - start[name]).abs().sum().item()
        gap += (ours[name] - tensor).abs().sum().item()
        representable += (ours[name] == ours[name].bfloat16().float()).sum().item()
        total += tensor.numel()
    print(f"{save_dir.name}: mean |export - bf16 reference| {gap / total:.2e}, mean move {moved / total:.2e}, "
          f"bf16-representable {representable / total:.3f}")
    assert gap < 0.02 * moved, (gap / total, moved / total)
    assert representable < 0.1 * total  # fp32 masters, not the bf16 working copy


def _one_rank(tmp: Path, name: str, stage, **kwargs) -> tuple[list[float], dict]:
    tree = recipe(tmp / name, **kwargs)
    tree["parallel"]["zero_stage"] = stage
    run_on_ranks(_worker, 1, tree, str(tmp))
    records = step_records(tmp / name)
    return [records[s]["train_loss"] for s in range(1, STEPS + 1)], json.loads((tmp / f"{name}.json").read_text())


def test_one_rank_auto_runs_zero1_and_trains_as_zero3(source):
    """The 'auto' rule at one data-parallel rank: ZeRO-1 (BF16_Optimizer), which gives ZeRO-3's
    bf16 losses to well within bf16 rounding (same fp32 master weights and accumulation; only the
    reduction order of the gradient norm differs)."""
    tmp = source["tmp"]
    auto_bf16, info = _one_rank(tmp, "auto_bf16", "auto", precision="bf16", init_from=source["converted"][1])
    assert info["optimizer"] == "BF16_Optimizer" and info["master_dtype"] == "torch.float32"
    zero3_bf16, info3 = _one_rank(tmp, "zero3_bf16", 3, precision="bf16", init_from=source["converted"][1])
    assert info3["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    delta = max(abs(a - b) for a, b in zip(zero3_bf16, source["fp32"].losses))  # bf16's own error
    gap = max(abs(a - b) for a, b in zip(auto_bf16, zero3_bf16))
    assert gap <= 0.5 * delta, (gap, delta, auto_bf16, zero3_bf16)
