"""Work done once rather than per layer or per batch: the fused-RoPE cos/sin table, the
validation loss read back from the device, and no idle gloo groups beside NCCL (issue 16, item 7)."""

from __future__ import annotations

import types

import pytest
import torch

from tests.hf_helpers import tricky_config


def test_fused_rope_table_is_built_once_not_per_layer_and_forward(mcore_cpu, monkeypatch):
    """Before: every layer of every forward rebuilt the fp32 table (4 builds for 2 layers x 2
    forwards). Now one build serves all, and the logits are unchanged."""
    from megatron_tinyllama.model import attention
    from megatron_tinyllama.model.build import build_model, forward_logits
    from megatron_tinyllama.model.kernels import KernelPlan
    from megatron_tinyllama.model.rope import rotary_cos_sin

    builds = []

    def counting(*args, **kwargs):
        builds.append(args[:2])
        return rotary_cos_sin(*args, **kwargs)

    monkeypatch.setattr(attention, "rotary_cos_sin", counting)
    monkeypatch.setattr(attention, "compiled_rope", lambda: attention.apply_rope_fp32)
    attention._cached_cos_sin.cache_clear()
    cfg = tricky_config()
    assert cfg.num_layers == 2
    plain = build_model(cfg).eval()
    fused = build_model(cfg, kernels=KernelPlan(rope="compiled")).eval()
    fused.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first, second = forward_logits(fused, tokens), forward_logits(fused, tokens)
        expected = forward_logits(plain, tokens)
    assert builds == [(24, cfg.head_dim)]
    assert torch.equal(first, second) and (first - expected).abs().max().item() <= 1e-5
    # A table made under inference_mode cannot be saved for backward: it is kept apart.
    with torch.inference_mode():
        forward_logits(fused, tokens)
    forward_logits(fused.train(), tokens).sum().backward()
    assert len(builds) == 2


def test_evaluate_reads_the_loss_back_once(mcore_cpu, monkeypatch):
    """Before: one .item() (a host-device sync) per validation batch. Now the losses are summed
    on the device and read once; the mean is the same."""
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.data import loader
    from megatron_tinyllama.train import loop

    cfg = config_from_dict({"model": {"preset": "tinyllama-debug", "seq_length": 8},
                            "data": {"blend": "x", "valid_blend": "v"},
                            "train": {"micro_batch_size": 2},
                            "logging": {"eval_tokens": 5 * 2 * 8}})
    batches = [{"tokens": torch.full((2, 8), float(i) + 0.25)} for i in range(5)]
    monkeypatch.setattr(loader, "build_valid_batches", lambda *a, **k: iter(batches))
    monkeypatch.setattr(loop, "compute_loss", lambda te, cfg, batch: (
        None, {"lm_loss": batch["tokens"].float().mean() * 1.5}))
    calls = []
    real_item = torch.Tensor.item

    def counting_item(self):
        calls.append(self.shape)
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    engine = types.SimpleNamespace(eval=lambda: None, train=lambda: None)
    mean = loop.evaluate(types.SimpleNamespace(engine=engine), cfg)
    monkeypatch.undo()
    assert len(calls) == 1
    assert mean == pytest.approx(sum(1.5 * (i + 0.25) for i in range(5)) / 5, abs=1e-12)


@pytest.mark.parametrize("cuda", [True, False])
def test_no_gloo_twins_of_the_process_groups(monkeypatch, cuda):
    """megatron-core creates a gloo copy of every DP group by default; only its own distributed
    optimizer uses them. On GPU they were created (idle gloo sockets on every node); now never."""
    from megatron.core import parallel_state

    from megatron_tinyllama.parallel import cpu_shim, init

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(cpu_shim, "cpu_shim_active", lambda: True)
    monkeypatch.setattr(init.dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", lambda **kw: seen.update(kw))
    monkeypatch.setattr(init, "set_seed", lambda seed: None)
    init.initialize_model_parallel(2, seed=1)
    assert seen == {"tensor_model_parallel_size": 2, "create_gloo_process_groups": False}
