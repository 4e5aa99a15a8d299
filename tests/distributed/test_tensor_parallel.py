"""Tensor parallelism over gloo: TP=2 equals TP=1, and TP=2 checkpoints convert to HF with parity."""

from __future__ import annotations

import pytest
import torch

from megatron_tinyllama.checkpoint.convert import convert_from_hf, convert_to_hf
from megatron_tinyllama.checkpoint.hf import merge_tp_shards
from megatron_tinyllama.checkpoint.native import clean_state, load_model_checkpoint
from megatron_tinyllama.model.build import build_model, forward_logits, language_model_loss
from megatron_tinyllama.parallel.init import set_seed
from tests.distributed.ranks import run_on_ranks
from tests.hf_helpers import hf_logits, save_hf_model, tricky_config

pytestmark = pytest.mark.distributed

SEED = 21


def _tokens(cfg):
    return torch.randint(0, cfg.vocab_size, (2, 25), generator=torch.Generator().manual_seed(9))


def _gathered_logits(model, tokens, vocab_size):
    import torch.distributed as dist
    from megatron.core import parallel_state

    local = forward_logits(model, tokens)
    parts = [torch.empty_like(local) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[..., :vocab_size]


def _tp2_worker(rank, world_size, out_dir, hf_dir, ours_tp2_dir):
    from megatron_tinyllama.checkpoint.native import load_into_model, load_model_shard, write_model_files
    from megatron_tinyllama.parallel.init import initialize_model_parallel

    cfg = tricky_config()
    initialize_model_parallel(tensor_parallel_size=2, seed=SEED)
    model = build_model(cfg, tensor_parallel_size=2).eval()
    tokens = _tokens(cfg)
    logits = forward_logits(model, tokens[:, :-1])
    loss, _ = language_model_loss(logits, tokens[:, 1:], torch.ones(2, 24))
    write_model_files(out_dir, cfg, rank, 2, model.state_dict())
    with torch.no_grad():
        full_logits = _gathered_logits(model, tokens, cfg.vocab_size)
        # The HF checkpoint converted in at TP=2 must run on these ranks as it does in HF.
        hf_model = build_model(cfg, tensor_parallel_size=2).eval()
        load_into_model(hf_model, load_model_shard(ours_tp2_dir, rank, 2), source=str(ours_tp2_dir))
        from_hf_logits = _gathered_logits(hf_model, tokens, cfg.vocab_size)
    if rank == 0:
        torch.save({"loss": loss.detach(), "logits": full_logits, "from_hf_logits": from_hf_logits},
                   out_dir / "results.pt")


def test_tp2_matches_tp1_and_converts_to_hf_with_parity(mcore_cpu, tmp_path):
    from megatron_tinyllama.checkpoint.native import MODEL_INDEX

    cfg = tricky_config()
    hf_src = save_hf_model(cfg, tmp_path / "hf_src", seed=8)
    ours_tp2 = convert_from_hf(hf_src, tmp_path / "from_hf_tp2", tensor_parallel_size=2)
    out = tmp_path / "tp2"
    out.mkdir()
    run_on_ranks(_tp2_worker, 2, out, hf_src, ours_tp2)
    assert (out / MODEL_INDEX).is_file()
    results = torch.load(out / "results.pt")

    # Same seed at TP=1: identical weights (CPU initialisation slices one master weight) and loss.
    set_seed(SEED)
    model = build_model(cfg).eval()
    _, shards = load_model_checkpoint(out)
    merged = merge_tp_shards(shards)
    for key, tensor in clean_state(model.state_dict()).items():
        assert torch.equal(tensor, merged[key]), key
    tokens = _tokens(cfg)
    loss, _ = language_model_loss(forward_logits(model, tokens[:, :-1]), tokens[:, 1:], torch.ones(2, 24))
    assert abs(loss.item() - results["loss"].item()) <= 1e-5

    # The TP=2 checkpoint converted to HF gives the TP=2 model's logits.
    hf_dir = convert_to_hf(out, tmp_path / "hf")
    assert (hf_logits(hf_dir, tokens) - results["logits"]).abs().max().item() <= 1e-4
    # And an HF checkpoint converted in at TP=2 runs on two ranks as HF runs it.
    assert (hf_logits(hf_src, tokens) - results["from_hf_logits"]).abs().max().item() <= 1e-4


def _levers_tp2_worker(rank, world_size, out_dir):
    from megatron_tinyllama.model.kernels import PLAIN_PLAN, KernelPlan
    from megatron_tinyllama.parallel.init import initialize_model_parallel

    cfg = tricky_config()  # vocabulary 500 padded to 512: rank 1 holds 12 padding columns
    initialize_model_parallel(tensor_parallel_size=2, seed=SEED)
    tokens = _tokens(cfg)
    mask = torch.ones(2, 24)
    mask[0, :3] = 0
    results = {}
    levers = KernelPlan(norm="compiled", rope="compiled", gqa="native", cross_entropy="chunked")
    for name, plan in (("plain", PLAIN_PLAN), ("levers", levers)):
        set_seed(SEED)
        model = build_model(cfg, tensor_parallel_size=2, kernels=plan)
        loss, metrics = language_model_loss(forward_logits(model, tokens[:, :-1]), tokens[:, 1:], mask,
                                            z_loss_weight=1e-2, vocab_size=cfg.vocab_size,
                                            backend=plan.cross_entropy)
        loss.backward()
        results[name] = {"loss": loss.detach(), "z_loss": metrics["z_loss"],
                         "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    torch.save(results, out_dir / f"levers_rank{rank}.pt")


def test_levers_at_tp2_give_the_plain_loss_and_gradient_shards(tmp_path):
    """The chunked cross-entropy's all-reduces (and padding on one rank only), RoPE and native
    GQA on head shards: every rank's gradient shard equals the plain path's."""
    run_on_ranks(_levers_tp2_worker, 2, tmp_path)
    for rank in range(2):
        results = torch.load(tmp_path / f"levers_rank{rank}.pt")
        plain, levers = results["plain"], results["levers"]
        assert abs(plain["loss"].item() - levers["loss"].item()) <= 1e-6
        assert abs(plain["z_loss"].item() - levers["z_loss"].item()) <= 1e-5
        for name, grad in plain["grads"].items():
            assert (levers["grads"][name] - grad).abs().max().item() <= 1e-5 * max(1.0, grad.abs().max().item()), name
