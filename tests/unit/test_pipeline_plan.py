"""tinyllama-pipeline's plan of the shipped v1.1 recipes, and what it refuses."""

import pytest

from megatron_tinyllama.config import ConfigError
from megatron_tinyllama.pipeline import REPO_V1_1, plan_pipeline, stage_recipes


@pytest.mark.parametrize("variant", ["general", "math_code", "chinese"])
def test_each_variant_is_three_chained_stages_on_one_schedule(variant, tmp_path):
    files = stage_recipes(REPO_V1_1, variant)
    assert [p.name for p in files] == ["stage1_basic.yaml", f"stage2_{variant}.yaml", f"stage3_{variant}.yaml"]
    stages = plan_pipeline(files, run_dir=tmp_path)
    cfgs = [cfg for _, _, cfg in stages]
    assert [c.stage.number for c in cfgs] == [1, 2, 3] and {c.stage.count for c in cfgs} == {3}
    assert cfgs[0].checkpoint.continue_from is None
    for previous, cfg in zip(cfgs, cfgs[1:]):
        assert cfg.checkpoint.continue_from == previous.checkpoint.save_dir
        assert cfg.optimizer == cfgs[0].optimizer  # one cosine, continued
        assert cfg.train.train_tokens > previous.train.train_tokens
    assert [c.train.train_tokens for c in cfgs] == [1_500_000_000_000, 1_850_000_000_000, 2_000_000_000_000]


def test_unknown_variant_and_wrong_stage_numbers_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"no stage recipes for variant 'klingon'.*'chinese', 'general', 'math_code'"):
        stage_recipes(REPO_V1_1, "klingon")
    files = stage_recipes(REPO_V1_1, "general")
    with pytest.raises(ConfigError, match="stage.number=1, stage.count=3, but it is stage 2 of 3"):
        plan_pipeline([files[0], files[0], files[2]], run_dir=tmp_path)
