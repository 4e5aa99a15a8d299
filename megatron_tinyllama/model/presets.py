"""Named model shapes: TinyLlama, the over-training testbed of Gadre et al., and tiny test shapes.

A preset is a plain dict of :class:`~megatron_tinyllama.config.ModelConfig` fields; a recipe names
it (``model.preset``), Python code calls ``ModelConfig.from_preset(name, **overrides)``, and
either may override any field.
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


def _llama(hidden: int, ffn: int, layers: int, heads: int, groups: int, vocab: int,
           seq: int) -> dict[str, Any]:
    # TinyLlama's structure: GQA, RMSNorm (eps 1e-5), RoPE base 10000, untied, no qk-norm.
    return dict(
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_layers=layers,
        num_attention_heads=heads,
        num_query_groups=groups,
        vocab_size=vocab,
        seq_length=seq,
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        rope_base=10000.0,
        untie_embeddings=True,
        qk_layernorm=False,
        z_loss_weight=0.0,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "tinyllama-1.1b": _llama(2048, 5632, 22, 32, 4, vocab=32000, seq=2048),
    # Small shapes with TinyLlama's structure for tests and CPU demos.
    "tinyllama-debug": _llama(64, 176, 2, 8, 2, vocab=512, seq=64),
    "tinyllama-small": _llama(256, 704, 4, 8, 2, vocab=4096, seq=256),
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
    """A :class:`ModelConfig` for preset ``name`` with ``overrides`` applied
    (:meth:`ModelConfig.from_preset <megatron_tinyllama.config.ModelConfig.from_preset>`)."""
    from megatron_tinyllama.config import ModelConfig

    return ModelConfig.from_preset(name, **overrides)
