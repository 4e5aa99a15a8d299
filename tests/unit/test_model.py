"""The model built from megatron-core layers: shapes, parameter counts, attention, loss, CPU shim."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_tinyllama.config import ConfigError, ModelConfig
from megatron_tinyllama.model.build import build_model, forward_logits, language_model_loss, padded_vocab_size
from megatron_tinyllama.model.presets import PRESETS, get_preset


def test_tinyllama_preset_counts_exactly_1_100_048_384_parameters():
    cfg = get_preset("tinyllama-1.1b")
    assert cfg.num_parameters() == 1_100_048_384
    assert (cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers) == (2048, 5632, 22)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.vocab_size, cfg.seq_length) == (32, 4, 32000, 2048)
    assert cfg.untie_embeddings and cfg.normalization == "RMSNorm" and cfg.norm_epsilon == 1e-5


@pytest.mark.parametrize("name", ["tinyllama-debug", "testbed-d96-l8-h4"])
def test_built_model_matches_config_parameter_count(mcore_cpu, name):
    cfg = get_preset(name)
    model = build_model(cfg)
    built = sum(p.numel() for p in model.parameters())
    assert built == cfg.num_parameters(padded_vocab_size(cfg.vocab_size, 1))


def test_testbed_presets_match_released_open_lm_parameter_counts(testbed_models):
    # open_lm counts gain-only LayerNorms (d weights) and not its qk-norm parameters; ours carry a
    # bias in every LayerNorm and weight+bias in the per-head q/k norms.
    names = {"d=96_l=8_h=4": "testbed-d96-l8-h4", "d=512_l=8_h=4": "testbed-d512-l8-h4",
             "d=576_l=24_h=8": "testbed-d576-l24-h8", "d=1024_l=24_h=8": "testbed-d1024-l24-h8",
             "open_lm_1b": "open_lm_1b", "open_lm_7b": "open_lm_7b"}
    checked = 0
    for shape, preset in names.items():
        released = testbed_models.get(shape)
        assert released is not None, f"no released run for {shape}"
        cfg = get_preset(preset)
        extra = cfg.num_layers * (2 * cfg.hidden_size + 4 * cfg.head_dim) + cfg.hidden_size
        assert cfg.num_parameters() - extra == released, shape
        checked += 1
    assert checked == 6


def test_invalid_shapes_are_refused_with_the_field_name():
    with pytest.raises(ConfigError, match="num_query_groups"):
        ModelConfig(num_attention_heads=32, num_query_groups=5)
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        from megatron_tinyllama.model.build import build_transformer_config

        build_transformer_config(get_preset("tinyllama-debug"), tensor_parallel_size=3)


def test_fused_attention_matches_megatron_unfused_attention_with_gqa(mcore_cpu):
    """Our SDPA core attention equals megatron-core's DotProductAttention (which materialises the
    scores and uses the default causal mask that the CPU shim provides)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_tinyllama.model.attention import core_attention_class
    from megatron_tinyllama.model.build import build_transformer_config

    cfg = get_preset("tinyllama-debug")
    tcfg = build_transformer_config(cfg)
    seq, batch, heads, groups, hd = 16, 2, cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    q = torch.randn(seq, batch, heads, hd)
    k = torch.randn(seq, batch, groups, hd)
    v = torch.randn(seq, batch, groups, hd)
    reference = DotProductAttention(tcfg, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                    attention_type="self")(q, k, v, attention_mask=None)
    for backend in ("sdpa", "math"):
        ours = core_attention_class(backend)(tcfg, layer_number=1)(q, k, v, attention_mask=None)
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_flash_attn_backend_refused_without_cuda():
    from megatron_tinyllama.model.attention import resolve_attention_backend

    assert resolve_attention_backend("auto") == ("flash_attn" if torch.cuda.is_available() else "sdpa")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="flash_attn"):
            resolve_attention_backend("flash_attn")


def test_z_loss_is_mean_squared_log_partition(mcore_cpu):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 32, requires_grad=True)
    labels = torch.randint(0, 32, (2, 5))
    mask = torch.ones(2, 5)
    mask[1, 4] = 0
    loss, metrics = language_model_loss(logits, labels, mask, z_loss_weight=1e-2)
    log_z = torch.logsumexp(logits.detach(), dim=-1)
    ce = torch.nn.functional.cross_entropy(logits.detach().reshape(-1, 32), labels.reshape(-1), reduction="none")
    expected_ce = (ce * mask.reshape(-1)).sum() / mask.sum()
    expected_z = ((log_z ** 2) * mask).sum() / mask.sum()
    torch.testing.assert_close(metrics["lm_loss"], expected_ce)
    torch.testing.assert_close(metrics["z_loss"], expected_z)
    torch.testing.assert_close(loss.detach(), expected_ce + 1e-2 * expected_z)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_activation_checkpointing_gives_the_same_loss_and_grads_on_cpu(mcore_cpu):
    """Recompute goes through megatron-core's CUDA-RNG checkpoint function, which the shim serves."""
    from megatron_tinyllama.parallel.init import set_seed

    cfg = get_preset("tinyllama-debug")
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    results = []
    for recompute in (False, True):
        set_seed(7)
        model = build_model(dataclasses.replace(cfg, activation_checkpointing=recompute))
        loss, _ = language_model_loss(forward_logits(model, tokens[:, :-1]), tokens[:, 1:], torch.ones(2, 32))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_all_presets_are_valid_model_configs():
    for name in PRESETS:
        cfg = get_preset(name)
        assert cfg.num_parameters() > 0 and cfg.preset == name
