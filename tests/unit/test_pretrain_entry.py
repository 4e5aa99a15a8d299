"""The pretraining entry's argument handling and its early, named errors."""

import pytest

from megatron_tinyllama.config import ConfigError, config_from_dict
from megatron_tinyllama.data.loader import check_datasets_exist
from megatron_tinyllama.train.pretrain import build_parser, main


def test_launcher_arguments_and_overrides_are_accepted():
    args = build_parser().parse_args(["--local_rank=1", "--config", "r.yaml", "train.micro_batch_size=2",
                                      "--override", "optimizer.lr=1e-4"])
    assert args.config == "r.yaml" and args.overrides == ["train.micro_batch_size=2"]
    assert args.override == ["optimizer.lr=1e-4"]


def test_bad_recipe_exits_2_with_the_field_named(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  micro_batch_size: -x\n")
    assert main(["--config", str(recipe)]) == 2
    assert "train.micro_batch_size" in capsys.readouterr().err


def test_missing_dataset_is_named_before_any_setup(tmp_path):
    cfg = config_from_dict({"data": {"blend": f"0.5 {tmp_path}/a 0.5 {tmp_path}/b"}})
    (tmp_path / "a.bin").write_bytes(b"")
    (tmp_path / "a.idx").write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"data\.blend: {tmp_path}/b has no indexed dataset"):
        check_datasets_exist(cfg.data)


def test_output_folders_that_cannot_be_created_are_named_per_rank(tmp_path):
    from megatron_tinyllama.train.metrics import output_problems

    (tmp_path / "a_file").write_text("")
    blocked = tmp_path / "a_file" / "sub"
    cfg = config_from_dict({"checkpoint": {"save_dir": str(tmp_path / "run")},
                            "logging": {"tensorboard_dir": str(blocked / "tb")}})
    assert output_problems(cfg, rank=1) == []  # only rank 0 writes TensorBoard events
    assert output_problems(cfg, rank=0) == [
        f"logging.tensorboard_dir: cannot create or write {blocked / 'tb'}: Not a directory "
        f"({tmp_path / 'a_file'} is a file)"]
    cfg = config_from_dict({"checkpoint": {"save_dir": str(tmp_path / "a_file")}})
    assert output_problems(cfg, rank=1) == [
        f"checkpoint.save_dir: cannot create or write {tmp_path / 'a_file'}: File exists "
        f"({tmp_path / 'a_file'} is a file)"]
    assert not list((tmp_path / "run").iterdir()) and (tmp_path / "a_file").read_text() == ""


def _write(prefix, lengths):
    import numpy as np

    from megatron_tinyllama.data.indexed import IndexedDatasetWriter

    lengths = np.asarray(lengths, dtype=np.int64)
    with IndexedDatasetWriter(str(prefix), np.uint16) as writer:
        writer.add_documents(np.arange(lengths.sum(), dtype=np.uint16) % 200 + 3, lengths)


def test_validation_dataset_without_tokens_exits_2_at_start_naming_it(tmp_path, caplog):
    """Before: the start checks passed, training ran, and the first evaluation raised after the
    last checkpoint, on every restart. Now the recipe is refused before anything is built."""
    _write(tmp_path / "train", [40, 50, 60])
    _write(tmp_path / "valid", [0, 0])  # documents that encoded to nothing
    _write(tmp_path / "unused", [0])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{preset: tinyllama-debug}}\n"
                      f"data:\n  blend: 1.0 {tmp_path}/train 0.0 {tmp_path}/unused\n"
                      f"  valid_blend: {tmp_path}/valid\n")
    assert main(["--config", str(recipe)]) == 2
    assert f"data.valid_blend: {tmp_path}/valid holds no tokens (2 documents" in caplog.text
    # A zero-weight dataset is never drawn from, so it may be empty; a drawn one may not.
    with pytest.raises(ConfigError, match=rf"data\.blend: {tmp_path}/unused holds no tokens"):
        check_datasets_exist(config_from_dict({"data": {"blend": f"0.9 {tmp_path}/train "
                                                                  f"0.1 {tmp_path}/unused"}}).data)
