"""The real TinyLlama 1.1B shape (random weights, fp32, CPU): exact size and HF logits parity.

Every tensor shape of the 1.1B is in its first layers (hidden 2048, FFN 5632, 32 query heads in
4 KV groups, vocabulary 32000), and the layer count only repeats them: the width is converted at
2 of its 22 layers (a fifth of the bytes, the same mapping), and the 22 layers at the debug width,
where a mapping that orders layers as strings ("layers.10" before "layers.2") would show.
"""

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


def _converted_logits_gap(cfg, tmp_path, *, count_as_layers: int = 0) -> float:
    """Build ``cfg`` at random, convert it to HF with the CLI's function, compare logits."""
    set_seed(0)
    model = build_model(cfg).eval()
    if count_as_layers:  # the built model's own layer, repeated: the full model's size
        total = sum(p.numel() for p in model.parameters())
        per_layer = sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n)
        assert total + (count_as_layers - cfg.num_layers) * per_layer == 1_100_048_384
    tokens = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = forward_logits(model, tokens)[..., : cfg.vocab_size].clone()
    (tmp_path / "ckpt").mkdir()
    write_model_files(tmp_path / "ckpt", cfg, 0, 1, model.state_dict())
    del model
    gc.collect()
    hf_dir = convert_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    return (ours - hf_logits(hf_dir, tokens)).abs().max().item()


def test_tinyllama_1b_width_converts_to_hf_with_logits_parity(mcore_cpu, tmp_path):
    cfg = get_preset("tinyllama-1.1b", num_layers=2)
    assert _converted_logits_gap(cfg, tmp_path, count_as_layers=22) <= 1e-4


def test_tinyllama_1b_depth_converts_to_hf_in_layer_order(mcore_cpu, tmp_path):
    cfg = get_preset("tinyllama-debug", num_layers=22)
    assert _converted_logits_gap(cfg, tmp_path) <= 1e-4
