"""Compiled layers under ZeRO-3 compute what eager layers compute: loss and every gradient.

``auto`` compiles the layers below ZeRO-3 (at ZeRO-3 they measured slower on an H200:
model/kernels.py); asked for with ``model.torch_compile: layers`` they run under ZeRO-3 too.
Under ZeRO-3 DeepSpeed gathers and releases each submodule's parameters in (compiler-disabled)
hooks, so a compiled layer runs as several graphs between them, and its backward must read
parameters that were released after forward and gathered again. The real engine
(``build_engine``: ``zero.Init``, ``deepspeed.initialize``) is built on 2 gloo ranks at ZeRO-3,
TP=1, every matrix partitioned over the 2 data-parallel ranks (the persistence threshold scaled
to the debug model: at DeepSpeed's default all its tensors are under it, kept whole, never
released), and at TP=2 with ``auto`` (one data-parallel rank: ZeRO-1, the compiled
path ``auto`` takes, with tensor-parallel collectives inside the compiled graphs), each with
``model.torch_compile`` ``none`` and ``layers``; the first micro-batch's loss and the full
gradients (gathered by DeepSpeed's ``safe_get_full_grad``) must agree to fp32 rounding, and so
must the loss after an optimizer step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.ranks import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


ZERO_STAGE = {1: 3, 2: "auto"}  # by TP degree, on 2 ranks


def _tree(tp: int, compile_mode: str, ds_config: str) -> dict:
    return {"model": {"preset": "tinyllama-debug", "vocab_size": 500, "seq_length": 32,
                      "torch_compile": compile_mode, "cross_entropy_backend": "chunked"},
            "parallel": {"tensor_parallel_size": tp, "zero_stage": ZERO_STAGE[tp], "seed": 1234,
                         "ds_config": ds_config},
            "train": {"precision": "fp32", "global_batch_tokens": 64 // tp, "micro_batch_size": 1}}


def _worker(rank, world_size, out_dir, ds_config):
    from deepspeed.utils import safe_get_full_grad

    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.engine.engine import build_engine
    from megatron_tinyllama.model.build import forward_logits, language_model_loss
    from megatron_tinyllama.parallel.init import initialize_distributed, initialize_model_parallel

    env = initialize_distributed()
    results = {}
    for tp in (1, 2):
        for compile_mode in ("none", "layers"):
            cfg = config_from_dict(_tree(tp, compile_mode, ds_config))
            initialize_model_parallel(tp, cfg.parallel.seed)
            te = build_engine(cfg, env)
            assert te.kernels.compile_layers == (compile_mode == "layers")
            assert te.engine.zero_optimization_stage() == (3 if tp == 1 else 1)
            if tp == 1:  # every matrix partitioned, released after use and gathered again
                persistent = {n for n, p in te.model.named_parameters() if p.ds_persist}
                assert all("norm" in n for n in persistent) and len(persistent) < len(list(te.model.parameters()))
            data_rank = rank if tp == 1 else 0
            tokens = torch.randint(0, 500, (2, 33), generator=torch.Generator().manual_seed(3 + data_rank))
            losses, grads = [], {}
            for step in range(2):  # one optimizer step (accumulation 1), then the next loss
                logits = forward_logits(te.engine, tokens[step:step + 1, :-1])
                loss, _ = language_model_loss(logits, tokens[step:step + 1, 1:], torch.ones(1, 32), 1e-2,
                                              vocab_size=500, backend=te.kernels.cross_entropy)
                te.engine.backward(loss)
                if step == 0:
                    grads = {name: safe_get_full_grad(p).clone() for name, p in te.model.named_parameters()}
                te.engine.step()
                losses.append(loss.detach().clone())
            results[(tp, compile_mode)] = {"losses": losses, "grads": grads}
            te.engine.destroy()
            torch._dynamo.reset()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_compiled_layers_give_the_eager_loss_and_gradients_under_zero3_and_at_tp2(tmp_path):
    from tests.distributed.test_reference_equivalence import _partitioned_ds_config

    run_on_ranks(_worker, 2, str(tmp_path), str(_partitioned_ds_config(tmp_path)))
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for tp in (1, 2):
            eager, compiled = results[(tp, "none")], results[(tp, "layers")]
            for before, after in zip(eager["losses"], compiled["losses"]):
                assert abs(before.item() - after.item()) <= 1e-5, (rank, tp, before, after)
            assert eager["grads"].keys() == compiled["grads"].keys()
            for name, grad in eager["grads"].items():
                scale = grad.abs().max().item()
                assert scale > 0, (rank, tp, name)  # every parameter is trained
                diff = (compiled["grads"][name] - grad).abs().max().item()
                assert diff <= 1e-5 * max(1.0, scale), (rank, tp, name, diff)
