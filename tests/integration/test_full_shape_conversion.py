"""The real TinyLlama 1.1B shape (random weights, fp32, CPU): exact size and HF logits parity."""

from __future__ import annotations

import gc

import pytest
import torch

from megatron_tinyllama.checkpoint.convert import convert_to_hf
from megatron_tinyllama.checkpoint.native import write_model_files
from megatron_tinyllama.model.build import build_model, forward_logits
from megatron_tinyllama.model.presets import get_preset
from megatron_tinyllama.parallel.init import set_seed
from tests.hf_helpers import hf_logits

pytestmark = pytest.mark.slow


def test_tinyllama_1b_converts_to_hf_with_logits_parity(mcore_cpu, tmp_path):
    cfg = get_preset("tinyllama-1.1b")
    set_seed(0)
    model = build_model(cfg).eval()
    assert sum(p.numel() for p in model.parameters()) == 1_100_048_384
    tokens = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = forward_logits(model, tokens)[..., : cfg.vocab_size].clone()
    (tmp_path / "ckpt").mkdir()
    write_model_files(tmp_path / "ckpt", cfg, 0, 1, model.state_dict())
    del model
    gc.collect()
    hf_dir = convert_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    theirs = hf_logits(hf_dir, tokens)
    assert (ours - theirs).abs().max().item() <= 1e-4
