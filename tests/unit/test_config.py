"""Recipe loading: presets, overrides, casting, and errors that name the field."""

import pytest

from megatron_tinyllama.config import ConfigError, config_from_dict, load_config, save_config

EXAMPLES = sorted((__import__("pathlib").Path(__file__).resolve().parents[2] / "examples").rglob("*.yaml"))


def test_preset_fills_fields_and_overrides_cast_to_the_field_type():
    cfg = config_from_dict({"model": {"preset": "tinyllama-1.1b", "num_layers": 4}},
                           ["train.micro_batch_size=2", "optimizer.lr=3e-4", "data.blend=0.7 a 0.3 b",
                            "model.qk_layernorm=true", "train.train_tokens=1e9"])
    assert cfg.model.hidden_size == 2048 and cfg.model.num_layers == 4 and cfg.model.qk_layernorm is True
    assert cfg.train.micro_batch_size == 2 and cfg.optimizer.lr == 3e-4
    assert cfg.train.train_tokens == 10**9 and isinstance(cfg.train.train_tokens, int)
    assert cfg.data.blend == ("0.7", "a", "0.3", "b")


def test_a_preset_means_the_same_in_python_as_in_a_recipe():
    import dataclasses

    from megatron_tinyllama.config import ModelConfig
    from megatron_tinyllama.model.presets import PRESETS

    debug = PRESETS["tinyllama-debug"]
    for cfg in (ModelConfig(preset="tinyllama-debug", vocab_size=1000),
                ModelConfig.from_preset("tinyllama-debug", vocab_size=1000),
                config_from_dict({"model": {"preset": "tinyllama-debug", "vocab_size": 1000}}).model):
        assert cfg.preset == "tinyllama-debug" and cfg.vocab_size == 1000  # the override wins
        assert {k: getattr(cfg, k) for k in debug if k != "vocab_size"} == \
            {k: v for k, v in debug.items() if k != "vocab_size"}
    assert ModelConfig(preset="tinyllama-debug").num_parameters() < 10**6 < ModelConfig().num_parameters()
    # Copies keep what they were given; only fields not given come from the preset.
    small = dataclasses.replace(ModelConfig.from_preset("tinyllama-debug"), num_layers=3)
    assert (small.num_layers, small.hidden_size) == (3, debug["hidden_size"])
    with pytest.raises(ConfigError, match=r"model\.preset: unknown preset 'nope'; known: \["):
        ModelConfig.from_preset("nope")
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['hidden'\]"):
        ModelConfig(hidden=3)


@pytest.mark.parametrize("tree, overrides, message", [
    ({"model": {"hidden_sizes": 3}}, [], r"model: unknown key\(s\) \['hidden_sizes'\]"),
    ({}, ["train.micro_batch_size=two"], r"train\.micro_batch_size: expected an integer"),
    ({}, ["train.precision=fp8"], r"train\.precision: 'fp8' is not one of"),
    ({"model": {"preset": "nope"}}, [], r"model\.preset: unknown preset 'nope'"),
    ({}, ["optimizer.min_lr=1e-3", "optimizer.lr=1e-4"], r"optimizer\.min_lr=0\.001 exceeds"),
    ({}, ["train.global_batch_tokens=1000"], r"not a multiple of model\.seq_length"),
    ({}, ["trainmicro_batch_size"], r"expected section\.field=value"),
])
def test_bad_recipes_name_the_field(tree, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(tree, overrides)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("train:\n  micro_batch_size: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train\.micro_batch_size"):
        load_config(bad)


def test_saved_config_loads_back_equal(tmp_path):
    cfg = config_from_dict({"model": {"preset": "tinyllama-debug"}, "data": {
        "blend": "0.5 a 0.5 b", "mixture_warmup": {"start_weights": [1, 0], "warmup_tokens": 10}}})
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.model.num_parameters() > 0
    assert cfg.optimizer.min_lr <= cfg.optimizer.lr


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"tinyllama_v1.yaml", "demo_cpu.yaml", "stage1_basic.yaml", "stage3_math_code.yaml"} <= names


def test_v1_recipe_is_the_published_one():
    cfg = load_config(next(p for p in EXAMPLES if p.name == "tinyllama_v1.yaml"))
    assert cfg.model.num_parameters() == 1_100_048_384
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.beta1, cfg.optimizer.beta2) == (4e-4, 4e-5, 0.9, 0.95)
    assert (cfg.optimizer.weight_decay, cfg.optimizer.grad_clip) == (0.1, 1.0)
    assert cfg.optimizer.warmup_tokens == 2000 * cfg.train.global_batch_tokens
    assert cfg.data.blend[0::2] == ("0.7", "0.3")


@pytest.mark.parametrize("override, message", [
    ("optimizer.min_lr=-4e-5", r"optimizer\.min_lr=-4e-05: must be >= 0"),
    ("optimizer.lr=-1e-3", r"optimizer\.lr=-0\.001: must be >= 0"),
    ("optimizer.lr=.nan", r"optimizer\.lr=nan: must be a finite number"),
    ("optimizer.beta2=1.0", r"optimizer\.beta2=1\.0: must be < 1"),
    ("optimizer.eps=0", r"optimizer\.eps=0\.0: must be > 0"),
    ("optimizer.grad_clip=-1", r"optimizer\.grad_clip=-1\.0: must be >= 0"),
    ("train.micro_batch_size=0", r"train\.micro_batch_size=0: must be >= 1"),
    ("train.train_tokens=0", r"train\.train_tokens=0: must be > 0"),
    ("train.start_tokens=-5", r"train\.start_tokens=-5: must be >= 0"),
    ("parallel.tensor_parallel_size=0", r"parallel\.tensor_parallel_size=0: must be >= 1"),
    ("model.num_query_groups=0", r"model\.num_query_groups=0: must be >= 1"),
    ("model.norm_epsilon=0", r"model\.norm_epsilon=0\.0: must be > 0"),
    ("checkpoint.save_interval_steps=0", r"checkpoint\.save_interval_steps=0: must be >= 1"),
    ("checkpoint.keep_last=-1", r"checkpoint\.keep_last=-1: must be >= 0"),
    ("logging.log_interval_steps=0", r"logging\.log_interval_steps=0: must be >= 1"),
])
def test_every_numeric_field_is_validated(override, message):
    """Values that used to train backwards (negative LR) or die in a ZeroDivisionError."""
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": {"preset": "tinyllama-debug"}}, [override])


def test_continue_from_excludes_init_from_and_start_tokens():
    with pytest.raises(ConfigError, match="exclusive"):
        config_from_dict({}, ["checkpoint.continue_from=a", "checkpoint.init_from=b"])
    with pytest.raises(ConfigError, match="train.start_tokens is for a stage started with"):
        config_from_dict({}, ["checkpoint.continue_from=a", "train.start_tokens=2048"])


def test_converter_refuses_a_tensor_parallel_size_of_zero(tmp_path, capsys):
    from megatron_tinyllama.checkpoint.convert import main_from_hf

    assert main_from_hf(["--input", str(tmp_path), "--output", str(tmp_path / "out"),
                         "--tensor-parallel-size", "0"]) == 2
    assert "tensor parallel size must be >= 1, got 0" in capsys.readouterr().err


def test_a_duplicate_section_or_key_is_refused_naming_both_lines(tmp_path):
    # PyYAML keeps the last of two equal keys: a stray second `model:` trained another shape.
    top = tmp_path / "top.yaml"
    top.write_text("name: x\nmodel:\n  preset: tinyllama-debug\ntrain:\n  train_tokens: 1000\n"
                   "model:\n  preset: tinyllama-1.1b\n")
    with pytest.raises(ConfigError, match=rf"^{top}:6: duplicate key 'model' \(first at {top}:2\)"):
        load_config(top)
    nested = tmp_path / "nested.yaml"
    nested.write_text("model:\n  preset: tinyllama-debug\n  num_layers: 2\n  hidden_size: 64\n"
                      "  num_layers: 4\n")
    with pytest.raises(ConfigError, match=rf"^{nested}:5: duplicate key 'num_layers' \(first at {nested}:3\)"):
        load_config(nested)
    # YAML's merge key may still be overridden: that is not a duplicate.
    anchored = tmp_path / "anchored.yaml"
    anchored.write_text("model:\n  <<: {preset: tinyllama-debug, num_layers: 2}\n  num_layers: 3\n")
    assert load_config(anchored).model.num_layers == 3
