"""Each speed lever computes what the plain path computes: loss and every gradient, on CPU.

The model is a converted transformers Llama with the layout traps switched on (GQA, a vocabulary
that needs TP padding, non-trivial norm gains, z-loss). The plain path itself is checked against
transformers in test_hf_convert.py and the distributed reference tests; here each lever is
compared with the plain path (fp32: to rounding) and the loss with transformers' own. GPU-only
kernels (liger, flash-attn, Transformer Engine, apex) have the same checks in tests/gpu/.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from megatron_tinyllama.config import ConfigError, config_from_dict
from megatron_tinyllama.model.build import build_model, forward_logits, language_model_loss
from megatron_tinyllama.model.kernels import PLAIN_PLAN, KernelPlan, resolve_kernels
from tests.hf_helpers import make_hf_model, tricky_config

CFG = tricky_config(seq_length=48)
Z_LOSS = 1e-2


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(CFG, seed=5)


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_length + 1), generator=gen)
    mask = torch.ones(2, CFG.seq_length)
    mask[1, -5:] = 0  # a masked tail: the mask must reach every backend
    return tokens, mask


def _our_model(hf, plan: KernelPlan, dtype=torch.float32):
    from megatron_tinyllama.checkpoint.hf import hf_to_mcore
    from megatron_tinyllama.model.build import padded_vocab_size

    model = build_model(CFG, kernels=plan)
    state = hf_to_mcore({k: v.clone() for k, v in hf.state_dict().items()}, CFG,
                               padded_vocab_size(CFG.vocab_size, 1))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not [m for m in missing if not m.endswith("_extra_state")] and not unexpected
    return model.to(dtype)


def _loss_and_grads(hf, plan, batch, dtype=torch.float32):
    tokens, mask = batch
    model = _our_model(hf, plan, dtype)
    logits = forward_logits(model, tokens[:, :-1])
    loss, metrics = language_model_loss(logits, tokens[:, 1:], mask, Z_LOSS, vocab_size=CFG.vocab_size,
                                        backend=plan.cross_entropy)
    loss.backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters()}
    return loss.detach().float(), metrics, grads


def _hf_loss(hf, batch):
    tokens, mask = batch
    with torch.no_grad():
        logits = hf(input_ids=tokens[:, :-1]).logits.float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size), tokens[:, 1:].reshape(-1),
                                           reduction="none")
    log_z = torch.logsumexp(logits, dim=-1).reshape(-1)
    m = mask.reshape(-1)
    return ((ce * m).sum() + Z_LOSS * (log_z ** 2 * m).sum()) / m.sum()


@pytest.fixture(scope="module")
def plain(hf_model, batch):
    from megatron_tinyllama.parallel.cpu_shim import single_rank_cpu

    with single_rank_cpu():
        return _loss_and_grads(hf_model, PLAIN_PLAN, batch)


LEVERS = {
    "norm=compiled": KernelPlan(norm="compiled"),
    "swiglu=fused": KernelPlan(swiglu="fused"),
    "rope=compiled": KernelPlan(rope="compiled"),
    "gqa=native": KernelPlan(gqa="native"),
    "cross_entropy=chunked": KernelPlan(cross_entropy="chunked"),
    "torch_compile=layers": KernelPlan(compile_layers=True),
}


def test_plain_path_loss_is_transformers_loss(plain, hf_model, batch):
    assert abs(plain[0].item() - _hf_loss(hf_model, batch).item()) <= 1e-5


@pytest.mark.parametrize("lever", list(LEVERS))
def test_each_lever_gives_the_plain_loss_and_gradients_in_fp32(mcore_cpu, hf_model, batch, plain, lever):
    loss, metrics, grads = _loss_and_grads(hf_model, LEVERS[lever], batch)
    assert abs(loss.item() - plain[0].item()) <= 1e-6, (loss, plain[0])
    assert abs(metrics["z_loss"].item() - plain[1]["z_loss"].item()) <= 1e-5
    assert grads.keys() == plain[2].keys()
    for name, grad in plain[2].items():
        scale = grad.abs().max().item()
        assert scale > 0, name  # every parameter is trained
        assert (grads[name] - grad).abs().max().item() <= 1e-5 * max(1.0, scale), name


def test_all_cpu_levers_together_in_bf16_stay_within_bf16_rounding(mcore_cpu, hf_model, batch, plain):
    """bf16: the levers (which round less often: fp32 RoPE and norm arithmetic, no bf16 softmax
    input) land as close to the fp32 loss as the plain bf16 path does. Tolerance derived as in
    test_reference_equivalence: delta = |plain bf16 - fp32|; allow 3 delta."""
    fused = KernelPlan(norm="compiled", swiglu="fused", rope="compiled", gqa="native",
                       cross_entropy="chunked")
    bf16_plain = _loss_and_grads(hf_model, PLAIN_PLAN, batch, torch.bfloat16)
    bf16_fused = _loss_and_grads(hf_model, fused, batch, torch.bfloat16)
    delta = abs(bf16_plain[0].item() - plain[0].item())
    assert 0 < delta < 0.05
    assert abs(bf16_fused[0].item() - plain[0].item()) <= 3 * delta
    for name, grad in plain[2].items():
        cos = torch.nn.functional.cosine_similarity(bf16_fused[2][name].flatten(), grad.flatten(), dim=0)
        cos_plain = torch.nn.functional.cosine_similarity(bf16_plain[2][name].flatten(), grad.flatten(), dim=0)
        assert cos >= min(0.99, cos_plain - 0.01), (name, cos.item(), cos_plain.item())


def test_megatron_fused_cross_entropy_in_bf16_matches_the_plain_loss(mcore_cpu):
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 512, dtype=torch.bfloat16) * 3
    labels = torch.randint(0, 500, (2, 7))
    mask = torch.ones(2, 7)
    results = []
    for backend in ("plain", "megatron_fused"):
        leaf = logits.clone().requires_grad_(True)
        x = leaf * 1  # a model's logits are not a leaf: the backends may mask them in place
        loss, metrics = language_model_loss(x, labels, mask, Z_LOSS, vocab_size=500, backend=backend)
        loss.backward()
        results.append((loss.detach(), metrics["z_loss"], leaf.grad.float()))
    assert abs(results[0][0] - results[1][0]) <= 1e-5
    assert abs(results[0][1] - results[1][1]) <= 1e-5
    assert (results[0][2] - results[1][2]).abs().max() <= 1e-3  # both gradients are rounded to bf16
    assert results[1][2][..., 500:].abs().max() == 0  # padding columns get no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_torch_across_chunks_and_padding(mcore_cpu, dtype):
    """Several chunks plus a partial one, padding columns, masked tokens: against torch's own
    cross_entropy and logsumexp on the unpadded columns, computed in fp32."""
    from megatron_tinyllama.model.loss import vocab_parallel_logsumexp_and_label_logit

    torch.manual_seed(1)
    vocab, padded = 300, 384
    logits = (torch.randn(3, 11, padded) * 4).to(dtype)
    labels = torch.randint(0, vocab, (3, 11))
    reference = logits.float()[..., :vocab].clone().requires_grad_(True)
    weights = torch.rand(3, 11)
    ce = torch.nn.functional.cross_entropy(reference.reshape(-1, vocab), labels.reshape(-1), reduction="none")
    lse = torch.logsumexp(reference, dim=-1).reshape(-1)
    ((ce * weights.reshape(-1)).sum() + 0.1 * (lse ** 2 * weights.reshape(-1)).sum()).backward()

    x = logits.clone().requires_grad_(True)
    log_z, label_logit = vocab_parallel_logsumexp_and_label_logit(x, labels, vocab, chunk_elements=4 * padded)
    assert log_z.dtype == torch.float32 and log_z.shape == labels.shape
    torch.testing.assert_close(log_z.reshape(-1), lse.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close((log_z - label_logit).reshape(-1), ce.detach(), atol=1e-5, rtol=1e-6)
    (((log_z - label_logit) * weights).sum() + 0.1 * (log_z ** 2 * weights).sum()).backward()
    assert x.grad.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(x.grad.float()[..., :vocab], reference.grad, atol=tolerance, rtol=tolerance)
    assert x.grad[..., vocab:].abs().max() == 0


def test_compiled_rope_angles_at_position_2047_are_transformers(mcore_cpu):
    """The fused RoPE computes its own table: fp32 positions, HF Llama's formula (a bf16 table
    would be off by whole radians at 2047)."""
    import transformers

    from megatron_tinyllama.checkpoint.hf import hf_config_dict
    from megatron_tinyllama.model.attention import apply_rope_fp32, rotary_cos_sin

    model_cfg = dataclasses.replace(CFG, seq_length=2048)
    cos, sin = rotary_cos_sin(2048, model_cfg.head_dim, model_cfg.rope_base, torch.device("cpu"))
    hf_rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(
        transformers.LlamaConfig(**hf_config_dict(model_cfg)))
    hf_cos, hf_sin = hf_rotary(torch.zeros(1), torch.arange(2048).unsqueeze(0))
    assert (cos - hf_cos[0]).abs().max() <= 1e-6 and (sin - hf_sin[0]).abs().max() <= 1e-6
    q = torch.randn(2048, 1, 2, model_cfg.head_dim)
    hf_q, _ = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(
        q.permute(1, 2, 0, 3), q.permute(1, 2, 0, 3), hf_cos, hf_sin)
    ours = apply_rope_fp32(q, cos[:, None, None], sin[:, None, None]).permute(1, 2, 0, 3)
    assert (ours - hf_q).abs().max() <= 1e-5


def test_auto_resolves_to_the_plain_path_without_cuda_and_to_fused_kernels_on_cuda(caplog):
    caplog.set_level(logging.INFO)
    assert resolve_kernels(CFG, cuda=False) == PLAIN_PLAN
    assert "norm backend: torch (auto)" in caplog.text and "cross-entropy backend: plain" in caplog.text
    on_gpu = resolve_kernels(CFG, precision="bf16", cuda=True, zero_stage=1)
    assert on_gpu.compile_layers and on_gpu.gqa == "native"
    assert (on_gpu.norm, on_gpu.swiglu, on_gpu.rope) == ("torch", "torch", "torch")  # inside the compiled layer
    assert on_gpu.cross_entropy in ("liger", "chunked")
    # Under ZeRO-3 auto runs eager layers with the single-op kernels: compiled layers measured
    # 1.34x slower there on an H200 (benchmarks/results/throughput_h200.json).
    zero3 = resolve_kernels(CFG, precision="bf16", cuda=True, zero_stage=3)
    eager = resolve_kernels(dataclasses.replace(CFG, torch_compile="none"), precision="bf16", cuda=True,
                            zero_stage=3)
    assert zero3 == eager
    assert not eager.compile_layers and eager.swiglu == "fused" and eager.norm != "torch"
    # Asked for, they compile under ZeRO-3 too.
    assert resolve_kernels(dataclasses.replace(CFG, torch_compile="layers"), precision="bf16", cuda=True,
                           zero_stage=3).compile_layers
    assert resolve_kernels(CFG, precision="bf16", cuda=True, tensor_parallel_size=2).cross_entropy == "chunked"


def test_requested_backend_that_cannot_run_falls_back_with_a_log_line(caplog):
    caplog.set_level(logging.INFO)
    if torch.cuda.is_available():
        pytest.skip("liger may run here")
    plan = resolve_kernels(dataclasses.replace(CFG, norm_backend="liger", cross_entropy_backend="megatron_fused"),
                           precision="fp32", cuda=False)
    assert plan.norm == "torch" and "norm backend: liger requested but cannot run here" in caplog.text
    assert plan.cross_entropy == "chunked" and "megatron_fused returns bf16 gradients" in caplog.text


def test_lever_fields_are_validated_by_name():
    with pytest.raises(ConfigError, match="model.norm_backend"):
        config_from_dict({"model": {"norm_backend": "fastest"}})
    cfg = config_from_dict({"model": {"preset": "tinyllama-debug", "cross_entropy_backend": "chunked",
                                      "torch_compile": "none"}})
    assert cfg.model.cross_entropy_backend == "chunked" and cfg.model.torch_compile == "none"


@pytest.fixture
def fake_liger(monkeypatch):
    """liger-kernel's functional API with its documented semantics written in torch, so that our
    glue (layouts, masks, padding, the z-loss split) is checked on CPU; the real Triton kernels are
    compared in tests/gpu."""
    import sys
    import types

    import transformers

    def liger_cross_entropy(input, target, ignore_index=-100, reduction="mean", lse_square_scale=0.0,
                            return_z_loss=False, **unused):
        assert input.dim() == 2 and reduction == "sum"
        keep = target != ignore_index
        lse = torch.logsumexp(input.float(), dim=-1)
        ce = torch.nn.functional.cross_entropy(input.float(), target.clamp(min=0), reduction="none")
        z = lse_square_scale * lse ** 2
        # As liger's kernel does: per-token losses stored in the input's dtype (its loss_1d and
        # z_loss_1d), then summed in that dtype.
        loss = ((ce + z) * keep).to(input.dtype).sum()
        z_sum = (z * keep).to(input.dtype).sum().detach()
        return types.SimpleNamespace(loss=loss, z_loss=z_sum) if return_z_loss else loss

    def liger_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        assert q.dim() == 4 and cos.dim() == 3 and cos.shape[0] == 1 and cos.dtype == torch.float32
        rotated = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(q.float(), k.float(), cos, sin)
        return rotated[0].to(q.dtype), rotated[1].to(k.dtype)

    def liger_rms_norm(x, w, eps, offset=0.0, casting_mode="llama", in_place=True):
        assert casting_mode == "llama" and not in_place
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps)

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_cross_entropy, functional.liger_rope, functional.liger_rms_norm = (
        liger_cross_entropy, liger_rope, liger_rms_norm)
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)


def test_liger_glue_gives_the_plain_loss_and_gradients(mcore_cpu, fake_liger, hf_model, batch, plain):
    loss, metrics, grads = _loss_and_grads(hf_model, KernelPlan(norm="liger", rope="liger", cross_entropy="liger"),
                                           batch)
    assert abs(loss.item() - plain[0].item()) <= 1e-5
    assert abs(metrics["z_loss"].item() - plain[1]["z_loss"].item()) <= 1e-4
    assert abs(metrics["lm_loss"].item() - plain[1]["lm_loss"].item()) <= 1e-5
    for name, grad in plain[2].items():
        assert (grads[name] - grad).abs().max().item() <= 1e-5 * max(1.0, grad.abs().max().item()), name


def test_a_compiled_layer_is_one_graph(mcore_cpu):
    """torch.compile fuses across the whole layer only if dynamo traces it without a break
    (megatron-core's RowParallelLinear warned on every call, which broke the graph twice per layer)."""
    import torch._dynamo as dynamo

    model = build_model(CFG, kernels=KernelPlan(gqa="native"))
    layer = model.decoder.layers[0]
    hidden = torch.randn(CFG.seq_length, 2, CFG.hidden_size, requires_grad=True)
    explanation = dynamo.explain(layer)(hidden, attention_mask=None,
                                        rotary_pos_emb=model.rotary_pos_emb(CFG.seq_length))
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def _fake_modules(monkeypatch, present=(), absent=()):
    """Python packages that import (empty modules) and compiled parts that do not (None in
    sys.modules makes ``import`` raise ImportError, as a missing .so does)."""
    import sys
    import types

    for name in present:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for name in absent:
        monkeypatch.setitem(sys.modules, name, None)


PYTHON_AND_COMPILED_PARTS = {
    "apex": (["apex", "apex.normalization"], "fused_layer_norm_cuda"),
    "te": (["transformer_engine", "transformer_engine.pytorch"], "transformer_engine_torch"),
    "liger": (["liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.functional"], "triton"),
}


@pytest.mark.parametrize("backend", list(PYTHON_AND_COMPILED_PARTS))
def test_a_backend_whose_compiled_part_does_not_load_is_not_available(monkeypatch, caplog, backend):
    """apex's ``apex.normalization`` imports without its CUDA extension and loads
    ``fused_layer_norm_cuda`` only inside forward: `auto` must not pick it (nor TE without its
    extension, nor liger without Triton), and asking for it falls back to the plain path."""
    from megatron_tinyllama.model import kernels

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    python_part, compiled_part = PYTHON_AND_COMPILED_PARTS[backend]
    for other, (other_python, _) in PYTHON_AND_COMPILED_PARTS.items():
        if other != backend:  # only the backend under test is installed
            _fake_modules(monkeypatch, absent=other_python[-1:])
    _fake_modules(monkeypatch, present=python_part, absent=[compiled_part])
    assert not kernels._AVAILABLE["norm"][backend]()
    eager = dataclasses.replace(CFG, torch_compile="none")  # no compiled layers: norm kernels are chosen
    zero3 = resolve_kernels(eager, precision="bf16", cuda=True, zero_stage=3)
    assert zero3.norm == "compiled", zero3  # the only fused norm left that can run
    asked = resolve_kernels(dataclasses.replace(eager, norm_backend=backend), precision="bf16", cuda=True,
                            zero_stage=3)
    assert asked.norm == "torch" and f"norm backend: {backend} requested but cannot run here" in caplog.text

    _fake_modules(monkeypatch, present=[compiled_part, "megatron.core.extensions.transformer_engine"])
    assert kernels._AVAILABLE["norm"][backend]()  # with its compiled part it is chosen
    assert resolve_kernels(eager, precision="bf16", cuda=True, zero_stage=3, log=False).norm == backend


@pytest.mark.parametrize("backend", ["plain", "chunked", "megatron_fused", "liger"])
def test_reported_loss_is_the_fp32_mean_for_every_backend(mcore_cpu, fake_liger, backend):
    """The logged loss (``lm_loss``, ``z_loss``) is an fp32 mean, exact to fp32 rounding, whatever
    kernel computed it: liger's kernel stores per-token losses in bf16 and sums them in bf16, where
    at ~1e4 the sum steps by 64 (the logged loss by ~0.01 here). Reference: float64 over the same
    bf16 logits."""
    torch.manual_seed(7)
    vocab, padded, tokens = 500, 512, 4096
    logits = (torch.randn(4, tokens // 4, padded) * 2).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (4, tokens // 4))
    mask = (torch.rand(4, tokens // 4) > 0.1).float()
    x64 = logits.double()[..., :vocab]
    lse = torch.logsumexp(x64, dim=-1)
    per_token = lse - x64.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    m = mask.double()
    want_lm, want_z = (per_token * m).sum() / m.sum(), (lse ** 2 * m).sum() / m.sum()

    x = logits.clone().requires_grad_(True) * 1  # not a leaf: backends may overwrite it
    loss, metrics = language_model_loss(x, labels, mask, Z_LOSS, vocab_size=vocab, backend=backend)
    assert metrics["lm_loss"].dtype == torch.float32 and metrics["z_loss"].dtype == torch.float32
    assert loss.dtype == torch.float32
    assert abs(metrics["lm_loss"].item() - want_lm.item()) <= 2e-6 * want_lm.item(), metrics["lm_loss"]
    assert abs(metrics["z_loss"].item() - want_z.item()) <= 2e-6 * want_z.item(), metrics["z_loss"]
    assert abs(loss.item() - (want_lm + Z_LOSS * want_z).item()) <= 2e-6 * want_lm.item()


def test_auto_never_picks_a_cross_entropy_whose_loss_is_not_an_fp32_mean(monkeypatch, fake_liger):
    """liger installed and runnable: `auto` still takes the chunked cross-entropy (fp32 mean, no
    host sync) and liger only for the norm and RoPE; asking for liger still gets it."""
    _fake_modules(monkeypatch, present=["triton"], absent=["transformer_engine.pytorch", "apex.normalization"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    eager = dataclasses.replace(CFG, torch_compile="none")
    plan = resolve_kernels(eager, precision="bf16", cuda=True, zero_stage=3, log=False)
    assert plan.cross_entropy == "chunked" and plan.norm == "liger", plan
    assert resolve_kernels(CFG, precision="bf16", cuda=True, zero_stage=3, log=False).cross_entropy == "chunked"
    asked = resolve_kernels(dataclasses.replace(CFG, cross_entropy_backend="liger"), precision="bf16",
                            cuda=True, zero_stage=3, log=False)
    assert asked.cross_entropy == "liger"
