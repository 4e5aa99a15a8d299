"""Named model shapes: TinyLlama, the over-training testbed of Gadre et al., and tiny test shapes.

A preset is a plain dict of :class:`~megatron_tinyllama.config.ModelConfig` fields; a recipe names
it (``model.preset``) and may override any field.
"""

from __future__ import annotations

from typing import Any


def open_lm_ffn_hidden_size(hidden_size: int) -> int:
    """SwiGLU width of open_lm (the testbed's code): 2/3 of 4d rounded up to a multiple of 256."""
    return 256 * ((int(2 * 4 * hidden_size / 3) + 256 - 1) // 256)


def _testbed(hidden: int, layers: int, heads: int) -> dict[str, Any]:
    # open_lm shapes: GPT-NeoX vocabulary, untied, LayerNorm without bias in the original
    # ("gain_only_lp_layer_norm"); megatron-core's LayerNorm carries a bias, so its parameter count
    # is larger by 2*d per norm; qk-LayerNorm and z-loss 1e-4 as in the released hyperparameters.
    return dict(
        hidden_size=hidden,
        ffn_hidden_size=open_lm_ffn_hidden_size(hidden),
        num_layers=layers,
        num_attention_heads=heads,
        num_query_groups=heads,
        vocab_size=50432,
        seq_length=2048,
        normalization="LayerNorm",
        norm_epsilon=1e-5,
        rope_base=10000.0,
        untie_embeddings=True,
        qk_layernorm=True,
        z_loss_weight=1e-4,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        ffn_hidden_size=5632,
        num_layers=22,
        num_attention_heads=32,
        num_query_groups=4,
        vocab_size=32000,
        seq_length=2048,
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        rope_base=10000.0,
        untie_embeddings=True,
        qk_layernorm=False,
        z_loss_weight=0.0,
    ),
    # Small shapes with TinyLlama's structure (GQA, RMSNorm, SwiGLU) for tests and CPU demos.
    "tinyllama-debug": dict(
        hidden_size=64,
        ffn_hidden_size=176,
        num_layers=2,
        num_attention_heads=8,
        num_query_groups=2,
        vocab_size=512,
        seq_length=64,
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        rope_base=10000.0,
        untie_embeddings=True,
        qk_layernorm=False,
        z_loss_weight=0.0,
    ),
    "tinyllama-small": dict(
        hidden_size=256,
        ffn_hidden_size=704,
        num_layers=4,
        num_attention_heads=8,
        num_query_groups=2,
        vocab_size=4096,
        seq_length=256,
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        rope_base=10000.0,
        untie_embeddings=True,
        qk_layernorm=False,
        z_loss_weight=0.0,
    ),
    "testbed-d96-l8-h4": _testbed(96, 8, 4),
    "testbed-d512-l8-h4": _testbed(512, 8, 4),
    "testbed-d576-l24-h8": _testbed(576, 24, 8),
    "testbed-d1024-l24-h8": _testbed(1024, 24, 8),
    "open_lm_1b": _testbed(2048, 24, 16),
    "open_lm_7b": _testbed(4096, 32, 32),
}


def preset_values(name: str) -> dict[str, Any]:
    """The field values of preset ``name``; an unknown name lists the known ones."""
    from megatron_tinyllama.config import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
    return dict(PRESETS[name])


def get_preset(name: str, **overrides: Any):
    """A :class:`ModelConfig` for preset ``name`` with ``overrides`` applied."""
    from megatron_tinyllama.config import ModelConfig

    return ModelConfig(**{**preset_values(name), **overrides, "preset": name})
