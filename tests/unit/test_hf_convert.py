"""Converter to and from Hugging Face Llama: layout traps, exact round trips, logits parity, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_tinyllama.checkpoint.convert import convert_from_hf, convert_to_hf, main_to_hf
from megatron_tinyllama.checkpoint.hf import (
    ConversionError,
    _qkv_join,
    _qkv_split,
    merge_tp_shards,
    shard_for_tp,
)
from megatron_tinyllama.checkpoint.native import load_into_model, load_model_checkpoint, write_model_files
from megatron_tinyllama.config import ConfigError
from megatron_tinyllama.model.build import build_model, forward_logits
from megatron_tinyllama.parallel.init import set_seed
from tests.hf_helpers import hf_logits, randomize_norms, save_hf_model, tricky_config


def test_fused_qkv_is_laid_out_per_query_group():
    cfg = tricky_config()  # 8 heads, 2 groups, head_dim 8
    hd, per_group = cfg.head_dim, cfg.num_attention_heads // cfg.num_query_groups
    q = torch.arange(cfg.num_attention_heads).repeat_interleave(hd).float().unsqueeze(1)  # row = head id
    k = 100 + torch.arange(cfg.num_query_groups).repeat_interleave(hd).float().unsqueeze(1)
    v = 200 + torch.arange(cfg.num_query_groups).repeat_interleave(hd).float().unsqueeze(1)
    fused = _qkv_join((q, k, v), cfg)
    row_heads = fused[::hd, 0].tolist()
    # group 0: q heads 0-3, k0, v0; group 1: q heads 4-7, k1, v1
    assert row_heads == [0, 1, 2, 3, 100, 200, 4, 5, 6, 7, 101, 201]
    assert per_group == 4
    for a, b in zip(_qkv_split(fused, cfg), (q, k, v)):
        assert torch.equal(a, b)


def test_swiglu_fc1_shards_are_gate_and_up_of_each_rank():
    gate = torch.arange(8).float().unsqueeze(1)
    up = 100 + torch.arange(8).float().unsqueeze(1)
    full = {"decoder.layers.0.mlp.linear_fc1.weight": torch.cat([gate, up])}
    shards = shard_for_tp(full, 2)
    assert shards[0]["decoder.layers.0.mlp.linear_fc1.weight"][:, 0].tolist() == [0, 1, 2, 3, 100, 101, 102, 103]
    assert shards[1]["decoder.layers.0.mlp.linear_fc1.weight"][:, 0].tolist() == [4, 5, 6, 7, 104, 105, 106, 107]
    assert torch.equal(merge_tp_shards(shards)["decoder.layers.0.mlp.linear_fc1.weight"], full[
        "decoder.layers.0.mlp.linear_fc1.weight"])


@pytest.mark.parametrize("tp", [1, 2])
def test_hf_to_ours_to_hf_is_bit_identical(tmp_path, tp):
    cfg = tricky_config()
    src = save_hf_model(cfg, tmp_path / "hf")
    ours = convert_from_hf(src, tmp_path / "ours", tensor_parallel_size=tp)
    model_cfg, shards = load_model_checkpoint(ours)
    assert len(shards) == tp
    assert shards[0]["embedding.word_embeddings.weight"].shape[0] * tp == 512  # 500 padded to 128*tp
    back = convert_to_hf(ours, tmp_path / "back")
    original, roundtrip = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert set(original) == set(roundtrip)
    for key in original:
        assert torch.equal(original[key], roundtrip[key]), key
    assert json.loads((back / "config.json").read_text())["vocab_size"] == 500


def test_our_model_and_converted_hf_model_give_the_same_logits(mcore_cpu, tmp_path):
    cfg = tricky_config()
    set_seed(11)
    model = build_model(cfg).eval()
    randomize_norms(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = forward_logits(model, tokens)[..., : cfg.vocab_size]
    (tmp_path / "ckpt").mkdir()
    write_model_files(tmp_path / "ckpt", cfg, 0, 1, model.state_dict())
    hf_dir = convert_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    theirs = hf_logits(hf_dir, tokens)
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_hf_model_converted_in_gives_the_same_logits(mcore_cpu, tmp_path):
    cfg = tricky_config()
    src = save_hf_model(cfg, tmp_path / "hf", seed=4)
    ours_dir = convert_from_hf(src, tmp_path / "ours", tensor_parallel_size=1)
    model_cfg, shards = load_model_checkpoint(ours_dir)
    model = build_model(model_cfg).eval()
    load_into_model(model, shards[0], source=str(ours_dir))
    tokens = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = forward_logits(model, tokens)[..., : cfg.vocab_size]
    assert (ours - hf_logits(src, tokens)).abs().max().item() <= 1e-4


def _no_leftovers(parent, name):
    return not any(p.name.startswith(f".{name}.tmp") for p in parent.iterdir()) and not (parent / name).exists()


def test_missing_tensor_is_named_and_nothing_is_written(tmp_path):
    cfg = tricky_config()
    src = save_hf_model(cfg, tmp_path / "hf")
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        convert_from_hf(src, tmp_path / "out")
    assert _no_leftovers(tmp_path, "out")


def test_mismatched_tensor_shape_is_named(tmp_path):
    cfg = tricky_config()
    src = save_hf_model(cfg, tmp_path / "hf")
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:-1].contiguous()
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"up_proj.*shape"):
        convert_from_hf(src, tmp_path / "out")
    assert _no_leftovers(tmp_path, "out")


def test_other_architecture_is_refused(tmp_path):
    cfg = tricky_config()
    src = save_hf_model(cfg, tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="model_type='gpt2'"):
        convert_from_hf(src, tmp_path / "out")
    assert _no_leftovers(tmp_path, "out")


def test_tp_degree_that_does_not_divide_heads_is_refused(tmp_path):
    src = save_hf_model(tricky_config(), tmp_path / "hf")
    with pytest.raises(ConfigError, match="tensor parallel size 3"):
        convert_from_hf(src, tmp_path / "out", tensor_parallel_size=3)
    assert _no_leftovers(tmp_path, "out")


def test_corrupt_shard_leaves_no_output_and_cli_exits_2(tmp_path, capsys):
    cfg = tricky_config()
    src = save_hf_model(cfg, tmp_path / "hf")
    ours = convert_from_hf(src, tmp_path / "ours", tensor_parallel_size=2)
    state = load_file(str(ours / "model-tp01-of-02.safetensors"))
    del state["decoder.final_layernorm.weight"]
    save_file(state, str(ours / "model-tp01-of-02.safetensors"))
    assert main_to_hf(["--input", str(ours), "--output", str(tmp_path / "hf_out")]) == 2
    assert "TP rank 1" in capsys.readouterr().err
    assert _no_leftovers(tmp_path, "hf_out")


def test_testbed_shapes_with_layernorm_are_refused_for_hf(mcore_cpu, tmp_path):
    from megatron_tinyllama.model.presets import get_preset

    cfg = get_preset("testbed-d96-l8-h4")
    (tmp_path / "ckpt").mkdir()
    write_model_files(tmp_path / "ckpt", cfg, 0, 1, {"x": torch.zeros(1)})
    with pytest.raises(ConversionError, match="RMSNorm"):
        convert_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert _no_leftovers(tmp_path, "hf")


def test_tokenizer_files_load_with_autotokenizer(mcore_cpu, tmp_path, llama_spm):
    import sentencepiece as spm
    import transformers

    cfg = tricky_config(vocab_size=512)
    set_seed(1)
    model = build_model(cfg)
    (tmp_path / "ckpt").mkdir()
    write_model_files(tmp_path / "ckpt", cfg, 0, 1, model.state_dict())
    hf_dir = convert_to_hf(tmp_path / "ckpt", tmp_path / "hf", tokenizer_model=llama_spm)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    processor = spm.SentencePieceProcessor(model_file=str(llama_spm))
    text = "Return the value of x.\n    def f(y): return 42"
    ids = tokenizer(text).input_ids
    assert ids[0] == processor.bos_id() == 1
    assert ids[1:] == processor.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
