"""Helpers for converter tests: random HF Llama checkpoints and our model's logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megatron_tinyllama.checkpoint.hf import hf_config_dict
from megatron_tinyllama.config import ModelConfig
from megatron_tinyllama.model.presets import get_preset


def tricky_config(**overrides) -> ModelConfig:
    """A tiny GQA shape with a vocabulary that needs TP padding and non-default eps/RoPE base,
    so that padding, epsilon placement and RoPE conventions all show up in logits."""
    base = dict(vocab_size=500, norm_epsilon=1e-3, rope_base=500.0, seq_length=32)
    base.update(overrides)
    return dataclasses.replace(get_preset("tinyllama-debug"), **base)


def make_hf_model(cfg: ModelConfig, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**hf_config_dict(cfg))
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # default ones would hide a misplaced norm weight
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model


def save_hf_model(cfg: ModelConfig, path: Path, seed: int = 0) -> Path:
    make_hf_model(cfg, seed).save_pretrained(str(path), safe_serialization=True)
    return path


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def randomize_norms(model: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
