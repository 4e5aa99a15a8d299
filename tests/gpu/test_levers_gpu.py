"""The speed levers on CUDA: each kernel computes what the plain path computes (gpu marker).

The CPU suite (tests/unit/test_kernels.py) covers every backend that runs on CPU; here the same
checks run on the GPU, where the kernels that only exist there (liger-kernel, flash-attn,
Transformer Engine, apex) and the CUDA code paths of the others (SDPA's flash kernel with native
GQA, the compiled chunked cross-entropy, inductor's Triton kernels) are used. A backend whose
library is not installed is skipped by name; benchmarks/gpu_session.sh installs liger-kernel.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from megatron_tinyllama.model.build import build_model, forward_logits, language_model_loss
from megatron_tinyllama.model.kernels import PLAIN_PLAN, KernelPlan, module_available, resolve_kernels
from tests.hf_helpers import make_hf_model, tricky_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# GQA, vocabulary padding, a sequence long enough for SDPA's flash kernel to be picked.
CFG = tricky_config(seq_length=256, hidden_size=256, num_attention_heads=8, num_query_groups=2,
                    ffn_hidden_size=704, vocab_size=1000)
Z_LOSS = 1e-3


@pytest.fixture(scope="module")
def mcore_gpu():
    """A 1-rank NCCL group with megatron-core parallel state (collectives on CUDA tensors)."""
    import socket

    import torch.distributed as dist

    from megatron_tinyllama.parallel.cpu_shim import single_rank_cpu

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        with single_rank_cpu():
            yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(CFG, seed=5)


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, CFG.vocab_size, (4, CFG.seq_length + 1), generator=gen).cuda()
    mask = torch.ones(4, CFG.seq_length, device="cuda")
    mask[1, -7:] = 0
    return tokens, mask


def run(hf, plan: KernelPlan, batch, dtype, attention_backend="sdpa"):
    from megatron_tinyllama.checkpoint.hf import hf_to_mcore
    from megatron_tinyllama.model.build import padded_vocab_size

    cfg = dataclasses.replace(CFG, attention_backend=attention_backend)
    model = build_model(cfg, kernels=plan)
    state = hf_to_mcore({k: v.clone() for k, v in hf.state_dict().items()}, cfg, padded_vocab_size(cfg.vocab_size, 1))
    model.load_state_dict(state, strict=False)
    model = model.to(device="cuda", dtype=dtype)
    tokens, mask = batch
    logits = forward_logits(model, tokens[:, :-1])
    loss, metrics = language_model_loss(logits, tokens[:, 1:], mask, Z_LOSS, vocab_size=cfg.vocab_size,
                                        backend=plan.cross_entropy)
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def references(mcore_gpu, hf_model, batch):
    """Plain path in fp32 (the exact answer) and in bf16 (bf16's own error, delta)."""
    fp32 = run(hf_model, PLAIN_PLAN, batch, torch.float32)
    bf16 = run(hf_model, PLAIN_PLAN, batch, torch.bfloat16)
    delta = abs(bf16[0] - fp32[0])
    assert 0 < delta < 0.05
    return fp32, bf16, delta


LEVERS = {
    "norm=compiled": (KernelPlan(norm="compiled"), None),
    "norm=liger": (KernelPlan(norm="liger"), "liger_kernel"),
    "norm=te": (KernelPlan(norm="te"), "transformer_engine"),
    "norm=apex": (KernelPlan(norm="apex"), "apex"),
    "swiglu=fused": (KernelPlan(swiglu="fused"), None),
    "rope=compiled": (KernelPlan(rope="compiled"), None),
    "rope=liger": (KernelPlan(rope="liger"), "liger_kernel"),
    "gqa=native": (KernelPlan(gqa="native"), None),
    "cross_entropy=chunked": (KernelPlan(cross_entropy="chunked"), None),
    "cross_entropy=megatron_fused": (KernelPlan(cross_entropy="megatron_fused"), None),
    "cross_entropy=liger": (KernelPlan(cross_entropy="liger"), "liger_kernel"),
    "torch_compile=layers": (KernelPlan(compile_layers=True), None),
    "auto": (None, None),
}


def _plan(name):
    plan, library = LEVERS[name]
    if library and not module_available(library):
        pytest.skip(f"{library} not installed")
    return plan or resolve_kernels(CFG, precision="bf16", zero_stage=1)


def _assert_close_to_fp32(result, references, factor=3.0):
    fp32, bf16, delta = references
    # bf16's own error (delta) is one draw and may be small by luck: floor it at 5e-4 of the loss.
    tolerance = factor * max(delta, 5e-4 * abs(fp32[0]))
    assert abs(result[0] - fp32[0]) <= tolerance, (result[0], fp32[0], delta)
    for name, grad in fp32[1].items():
        ours = torch.nn.functional.cosine_similarity(result[1][name].flatten(), grad.flatten(), dim=0).item()
        plain = torch.nn.functional.cosine_similarity(bf16[1][name].flatten(), grad.flatten(), dim=0).item()
        assert ours >= min(0.99, plain - 0.01), (name, ours, plain)


@pytest.mark.parametrize("lever", list(LEVERS))
def test_lever_in_bf16_is_as_close_to_fp32_as_the_plain_bf16_path(mcore_gpu, hf_model, batch, references, lever):
    _assert_close_to_fp32(run(hf_model, _plan(lever), batch, torch.bfloat16), references)


@pytest.mark.parametrize("lever", [k for k in LEVERS if k not in ("cross_entropy=megatron_fused", "norm=apex",
                                                                  "norm=te", "auto")])
def test_lever_in_fp32_gives_the_plain_loss_and_gradients(mcore_gpu, hf_model, batch, references, lever):
    """In fp32 the levers equal the plain path to fp32 rounding (megatron_fused is bf16-only)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    fp32 = references[0]
    loss, grads = run(hf_model, _plan(lever), batch, torch.float32)
    assert abs(loss - fp32[0]) <= 1e-5 * max(1.0, abs(fp32[0])), (loss, fp32[0])
    for name, grad in fp32[1].items():
        assert (grads[name] - grad).abs().max().item() <= 1e-4 * max(1.0, grad.abs().max().item()), name


def test_flash_attn_backend_with_every_lever(mcore_gpu, hf_model, batch, references):
    if not module_available("flash_attn"):
        pytest.skip("flash_attn not installed")
    plan = resolve_kernels(CFG, precision="bf16", zero_stage=1)
    _assert_close_to_fp32(run(hf_model, plan, batch, torch.bfloat16, attention_backend="flash_attn"), references)


def test_chunked_cross_entropy_needs_no_full_size_temporary(mcore_gpu):
    """TinyLlama's vocabulary and a micro-batch of 4 x 2048 tokens: the chunked loss's extra memory
    (forward + backward) is a small fraction of the plain path's fp32 copies."""
    torch.manual_seed(0)
    tokens, vocab = 4 * 2048, 32000
    labels = torch.randint(0, vocab, (4, 2048), device="cuda")
    mask = torch.ones(4, 2048, device="cuda")
    peaks, losses = {}, {}
    for backend in ("plain", "chunked"):
        # The same logits for both backends (drawn again from one seed: a kept copy would sit in
        # the measured memory). Drawing them from the running generator made the two losses
        # those of different logits, 0.015 apart on the first H200 run.
        same = torch.Generator(device="cuda").manual_seed(1)
        leaf = (torch.randn(4, 2048, vocab, device="cuda", generator=same) * 2).to(torch.bfloat16)
        leaf.requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, _ = language_model_loss(leaf * 1, labels, mask, Z_LOSS, vocab_size=vocab, backend=backend)
        loss.backward()
        torch.cuda.synchronize()
        peaks[backend] = torch.cuda.max_memory_allocated() - base
        losses[backend] = loss.item()
        del leaf, loss
    logits_bytes = tokens * vocab * 2
    assert abs(losses["plain"] - losses["chunked"]) <= 1e-4
    # plain: fp32 copies of the logits (cast, exp for the z-loss, megatron-core's softmax);
    # chunked: the product leaf*1 (its storage then holds its gradient), the leaf's gradient and
    # 128 MiB chunk temporaries.
    assert peaks["plain"] > 4 * logits_bytes, (peaks, logits_bytes)
    assert peaks["chunked"] < min(3.5 * logits_bytes, 0.5 * peaks["plain"]), (peaks, logits_bytes)


def test_compiled_and_liger_rope_at_position_2047_match_transformers(mcore_gpu):
    import transformers

    from megatron_tinyllama.checkpoint.hf import hf_config_dict
    from megatron_tinyllama.model.attention import compiled_rope, rotary_cos_sin

    model_cfg = dataclasses.replace(CFG, seq_length=2048)
    hf_rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(
        transformers.LlamaConfig(**hf_config_dict(model_cfg))).cuda()
    positions = torch.arange(2048, device="cuda").unsqueeze(0)
    hf_cos, hf_sin = hf_rotary(torch.zeros(1, device="cuda"), positions)
    q = torch.randn(2048, 2, 4, model_cfg.head_dim, device="cuda")
    expected, _ = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(
        q.permute(1, 2, 0, 3), q.permute(1, 2, 0, 3), hf_cos, hf_sin)
    cos, sin = rotary_cos_sin(2048, model_cfg.head_dim, model_cfg.rope_base, q.device)
    ours = compiled_rope()(q, cos[:, None, None], sin[:, None, None]).permute(1, 2, 0, 3)
    # Both tables are fp32: an angle at position 2047 carries ~2047 x 2^-24 of rounding, and CUDA's
    # pow gives inverse frequencies one ulp away from the CPU's that transformers uses (2.2e-4 apart
    # on the first H200 run). The bound: a 1-ulp frequency and a rounded product, times |q| of
    # both rotated halves; the bug class this guards against (positions rounded in bf16) is off by
    # whole radians, three orders of magnitude above it.
    tolerance = 2 * 3 * 2047 * 2.0 ** -24 * q.abs().max().item()
    exact = _rope_fp64(q.permute(1, 2, 0, 3), model_cfg.head_dim, model_cfg.rope_base)
    assert (ours.double() - exact).abs().max().item() <= tolerance
    assert (expected.double() - exact).abs().max().item() <= tolerance  # the bound holds for HF too
    assert (ours - expected).abs().max().item() <= 2 * tolerance
    if module_available("liger_kernel"):
        from liger_kernel.transformers.functional import liger_rope

        q_bhsd = q.permute(1, 2, 0, 3)
        liger_q, _ = liger_rope(q_bhsd, q_bhsd, cos.unsqueeze(0), sin.unsqueeze(0))
        assert (liger_q.double() - exact).abs().max().item() <= tolerance


def _rope_fp64(x: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """RoPE of ``x`` [b, h, s, d] (HF layout) with angles and arithmetic in float64."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=x.device) / head_dim))
    angles = torch.outer(torch.arange(x.shape[2], dtype=torch.float64, device=x.device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    x64 = x.double()
    first, second = x64.chunk(2, dim=-1)
    return x64 * angles.cos() + torch.cat((-second, first), dim=-1) * angles.sin()


def test_pinned_loader_batches_equal_pageable_ones(tmp_path):
    import numpy as np

    from megatron_tinyllama.config import DataConfig
    from megatron_tinyllama.data.indexed import IndexedDatasetWriter
    from megatron_tinyllama.data.loader import build_train_batches

    prefix = str(tmp_path / "d")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_documents(np.arange(64 * 40) % 500, np.full(40, 64))
    common = dict(seq_length=32, micro_batch_size=2, dp_rank=0, dp_size=1, consumed_samples=0, seed=3,
                  global_batch_size_at=4, num_samples=40)
    plain = list(build_train_batches(DataConfig(blend=(prefix,), num_workers=0, pin_memory=False), **common))
    pinned = list(build_train_batches(DataConfig(blend=(prefix,), num_workers=2, pin_memory=True), **common))
    assert len(plain) == len(pinned) > 0
    for a, b in zip(plain, pinned):
        assert all(b[k].is_pinned() for k in b)
        assert all(torch.equal(a[k], b[k]) for k in a)
