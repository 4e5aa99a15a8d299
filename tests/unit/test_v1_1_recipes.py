"""The TinyLlama v1.1 recipes against the paper (Zhang et al. 2024, §2.5 and Appendix A).

The expected numbers are written here from the paper, not read from the recipes: one cosine
schedule 4e-4 -> 4e-5 with 2000 warm-up steps over 2T tokens, kept through the cooldown; stage ends
at 1.5T, 1.85T and 2T tokens; batches of ~1.8M then ~7.2M tokens; the Math&Code and Chinese
mixtures of Appendix A (Tables 6-7); a linear domain warm-up over the first 6B tokens of stage 2.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from megatron_tinyllama.config import load_config
from megatron_tinyllama.data.blend import parse_blend
from megatron_tinyllama.engine.ds_config import batch_geometry, build_ds_config
from megatron_tinyllama.train.schedule import learning_rate

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
V1_1 = EXAMPLES / "tinyllama_v1_1"
VARIANTS = ("general", "math_code", "chinese")
STAGE_FILES = ["stage1_basic.yaml"] + [f"stage{s}_{v}.yaml" for s in (2, 3) for v in VARIANTS]
CLUSTER_RECIPES = sorted(p for p in EXAMPLES.rglob("*.yaml") if p.name != "demo_cpu.yaml")

PAPER_T = 10**12
PAPER_STAGE_END_TOKENS = {1: 1.5 * PAPER_T, 2: 1.85 * PAPER_T, 3: 2.0 * PAPER_T}
# Appendix A, Tables 6 and 7 (stage 2 and cooldown columns); TinyLlama v1.1: SlimPajama only.
PAPER_MIXTURES = {
    "general": {"slimpajama": 1.0},
    "math_code": {"slimpajama": 0.75, "starcoder": 0.15, "proof_pile": 0.10},
    "chinese": {"slimpajama": 0.50, "skypile": 0.50},
}


def _cfg(name: str):
    return load_config(V1_1 / name)


def paper_cosine_lr(tokens: float) -> float:
    """The paper's single schedule, written out: 2000 warm-up steps of the ~1.8M-token stage-1
    batch, then cosine from 4e-4 to 4e-5 at 2T tokens."""
    warmup = 2000 * 896 * 2048
    if tokens < warmup:
        return 4e-4 * tokens / warmup
    progress = min(1.0, (tokens - warmup) / (2 * PAPER_T - warmup))
    return 4e-5 + 0.5 * (4e-4 - 4e-5) * (1 + math.cos(math.pi * progress))


def test_every_stage_of_every_variant_is_a_file():
    assert sorted(p.name for p in V1_1.glob("*.yaml")) == sorted(STAGE_FILES)


@pytest.mark.parametrize("path", CLUSTER_RECIPES, ids=[p.name for p in CLUSTER_RECIPES])
@pytest.mark.parametrize("dp", [16, 32, 64])
def test_example_batch_splits_at_16_32_and_64_data_parallel_ranks(path, dp):
    cfg = load_config(path)
    geometry = batch_geometry(cfg, data_parallel_size=dp)
    assert geometry.global_batch_size * cfg.model.seq_length == cfg.train.global_batch_tokens
    assert (geometry.micro_batch_size * geometry.gradient_accumulation_steps * dp
            == geometry.global_batch_size)
    # The whole DeepSpeed config too, on nodes of 4 GPUs (v1.1's node-local sharding groups).
    ds = build_ds_config(cfg, data_parallel_size=dp, local_world_size=4)
    assert ds["train_batch_size"] == geometry.global_batch_size


def test_v1_1_batch_rule_micro_batch_7_splits_on_every_power_of_two_up_to_128():
    """896 = 7 x 128 sequences: micro-batch 7 divides it for any data-parallel size dividing 128."""
    for name in STAGE_FILES:
        cfg = _cfg(name)
        assert cfg.train.micro_batch_size == 7
        for dp in (1, 2, 4, 8, 16, 32, 64, 128):
            batch_geometry(cfg, data_parallel_size=dp)
    geometry = batch_geometry(_cfg("stage1_basic.yaml"), data_parallel_size=64)
    assert (geometry.global_batch_size, geometry.gradient_accumulation_steps) == (896, 2)


def test_batch_is_about_1_8m_tokens_then_7_2m_in_the_cooldown():
    for name in STAGE_FILES:
        cfg = _cfg(name)
        tokens = cfg.train.global_batch_tokens
        if name.startswith("stage3"):
            assert tokens == 4 * _cfg("stage1_basic.yaml").train.global_batch_tokens
            assert abs(tokens - 7.2e6) / 7.2e6 < 0.03
        else:
            assert abs(tokens - 1.8e6) / 1.8e6 < 0.03


def test_stage_lengths_are_the_papers():
    assert _cfg("stage1_basic.yaml").train.train_tokens == PAPER_STAGE_END_TOKENS[1]
    for variant in VARIANTS:
        assert _cfg(f"stage2_{variant}.yaml").train.train_tokens == PAPER_STAGE_END_TOKENS[2]
        assert _cfg(f"stage3_{variant}.yaml").train.train_tokens == PAPER_STAGE_END_TOKENS[3]


@pytest.mark.parametrize("name", STAGE_FILES)
def test_lr_at_1_5t_1_85t_and_2t_is_the_single_cosine(name):
    cfg = _cfg(name)
    for tokens in PAPER_STAGE_END_TOKENS.values():
        ours = learning_rate(int(tokens), cfg.optimizer, cfg.train.train_tokens)
        assert ours == pytest.approx(paper_cosine_lr(tokens), rel=1e-12), tokens
    # The paper's "already low" LR at the cooldown: ~4.5e-5 at 1.85T, not the constant 4e-4.
    assert learning_rate(int(1.85 * PAPER_T), cfg.optimizer, cfg.train.train_tokens) < 4.6e-5
    assert learning_rate(2 * PAPER_T, cfg.optimizer, cfg.train.train_tokens) == pytest.approx(4e-5)


def test_stages_share_one_optimizer_so_the_curve_continues():
    first = _cfg("stage1_basic.yaml").optimizer
    assert first.warmup_tokens == 2000 * _cfg("stage1_basic.yaml").train.global_batch_tokens
    for name in STAGE_FILES:
        assert _cfg(name).optimizer == first, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_blends_are_the_papers_proportions(variant):
    for stage in (2, 3):
        cfg = _cfg(f"stage{stage}_{variant}.yaml")
        prefixes, weights = parse_blend(cfg.data.blend)
        weights = weights or [1.0]
        shares = {}
        for prefix, weight in zip(prefixes, weights):
            corpus = next(k for k in ("slimpajama", "starcoder", "proof_pile", "skypile")
                          if Path(prefix).name.startswith(k))
            shares[corpus] = weight / sum(weights)
        assert shares == pytest.approx(PAPER_MIXTURES[variant]), (stage, shares)
    stage1 = parse_blend(_cfg("stage1_basic.yaml").data.blend)[0]
    assert [Path(p).name for p in stage1] == ["slimpajama_text_document"]


def test_starcoder_blend_is_the_python_and_jupyter_build():
    prefixes, _ = parse_blend(_cfg("stage2_math_code.yaml").data.blend)
    assert "data/starcoder_python_jupyter_content_document" in prefixes


@pytest.mark.parametrize("variant", ["math_code", "chinese"])
def test_domain_warmup_rises_from_stage_1_mixture_over_6b_tokens_from_the_stage_start(variant):
    cfg = _cfg(f"stage2_{variant}.yaml")
    warm = cfg.data.mixture_warmup
    assert warm.warmup_tokens == 6 * 10**9
    prefixes, _ = parse_blend(cfg.data.blend)
    assert [w for p, w in zip(prefixes, warm.start_weights) if "slimpajama" in p] == [1.0]
    assert sum(warm.start_weights) == 1.0
    raw = yaml.safe_load((V1_1 / f"stage2_{variant}.yaml").read_text())
    assert "start_tokens" not in raw["data"]["mixture_warmup"]  # resolved to the stage start
    assert _cfg(f"stage3_{variant}.yaml").data.mixture_warmup is None
    assert _cfg("stage2_general.yaml").data.mixture_warmup is None


def test_stages_chain_with_continue_from_and_no_start_tokens():
    stage1 = _cfg("stage1_basic.yaml")
    assert stage1.checkpoint.continue_from is None
    for variant in VARIANTS:
        stage2, stage3 = _cfg(f"stage2_{variant}.yaml"), _cfg(f"stage3_{variant}.yaml")
        assert stage2.checkpoint.continue_from == stage1.checkpoint.save_dir
        assert stage3.checkpoint.continue_from == stage2.checkpoint.save_dir
        assert len({stage1.checkpoint.save_dir, stage2.checkpoint.save_dir,
                    stage3.checkpoint.save_dir}) == 3
    for name in STAGE_FILES:
        raw = yaml.safe_load((V1_1 / name).read_text())
        assert "start_tokens" not in raw.get("train", {}), name
        assert "init_from" not in raw.get("checkpoint", {}), name
