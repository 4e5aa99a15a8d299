"""The initial weights are a function of the seed alone: drawn in fp32, identical at every ZeRO
stage and TP degree.

Under ``deepspeed.zero.Init`` every floating tensor is created in the engine dtype on the engine's
device, megatron-core's full-size "master weight" included, so at ZeRO-3 in bf16 the weights were
drawn in bf16 (on the GPU, from the CUDA generator, on a GPU machine), and ZeRO-1 and ZeRO-3 runs
with one seed started from different models. Here the real engine (``build_engine``) is built on 2
gloo ranks at ZeRO 1/2/3 x TP 1 and ZeRO 1/3 x TP 2, in bf16, and the full (ZeRO-gathered,
TP-merged) weights are compared; megatron-core slices each TP shard from one full draw, so
concatenating the shards along their partition dimension gives the full tensor back. The dtype
every weight is drawn in is recorded (``Tensor.normal_``): on CPU torch's bf16 ``normal_`` happens
to round an fp32 draw, so equal values alone would not show the GPU's bf16 draws; a draw on a bf16
tensor does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.ranks import run_on_ranks

pytestmark = pytest.mark.distributed

LAYOUTS = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 3)]
"""(tensor_parallel_size, zero_stage) on 2 ranks."""


def _tree(tp: int, stage: int, seed: int = 1234) -> dict:
    return {"model": {"preset": "tinyllama-debug", "vocab_size": 500, "seq_length": 32},
            "parallel": {"tensor_parallel_size": tp, "zero_stage": stage, "seed": seed},
            "train": {"precision": "bf16", "global_batch_tokens": 64, "micro_batch_size": 1}}


def _full_weights(model, tp: int) -> dict[str, torch.Tensor]:
    """Every parameter gathered over ZeRO-3 partitions and merged over TP ranks, as fp32."""
    import deepspeed
    import torch.distributed as dist
    from megatron.core import parallel_state

    params = dict(model.named_parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params.values())
    gather = deepspeed.zero.GatheredParameters(list(params.values())) if zero3 else None
    out = {}
    if gather is not None:
        gather.__enter__()
    try:
        for name, param in params.items():
            value = param.detach().float().clone()
            if tp > 1 and getattr(param, "tensor_model_parallel", False):
                shards = [torch.empty_like(value) for _ in range(tp)]
                dist.all_gather(shards, value, group=parallel_state.get_tensor_model_parallel_group())
                # megatron-core cuts the full tensor into tp x stride pieces along the partition
                # dimension and gives rank r the pieces r, r + tp, ... (stride 2: SwiGLU's fc1).
                stride, dim = getattr(param, "partition_stride", 1), param.partition_dim
                pieces = [shard.chunk(stride, dim=dim) for shard in shards]
                value = torch.cat([pieces[r][s] for s in range(stride) for r in range(tp)], dim=dim)
            out[name] = value
    finally:
        if gather is not None:
            gather.__exit__(None, None, None)
    return out


def _worker(rank, world_size, out_dir):
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.engine.engine import build_engine
    from megatron_tinyllama.parallel.init import initialize_distributed, initialize_model_parallel

    env = initialize_distributed()
    results, draws = {}, []
    normal_ = torch.Tensor.normal_

    def recording_normal_(tensor, *args, **kwargs):  # in which dtype every weight is drawn
        draws.append(tensor.dtype)
        return normal_(tensor, *args, **kwargs)

    torch.Tensor.normal_ = recording_normal_
    for index, (tp, stage) in enumerate(LAYOUTS):
        cfg = config_from_dict(_tree(tp, stage))
        initialize_model_parallel(tp, cfg.parallel.seed)
        torch.randn(index * 7 + 1)  # other users of torch's RNG must not move the weights
        draws.clear()
        te = build_engine(cfg, env)
        assert next(te.model.parameters()).dtype == torch.bfloat16
        results[(tp, stage)] = _full_weights(te.model, tp)
        results[(tp, stage, "drawn in")] = sorted({str(dtype) for dtype in draws})
        te.engine.destroy()
    torch.Tensor.normal_ = normal_
    cfg = config_from_dict(_tree(1, 1, seed=4321))
    initialize_model_parallel(1, cfg.parallel.seed)
    te = build_engine(cfg, env)
    results["other seed"] = _full_weights(te.model, 1)
    te.engine.destroy()
    if rank == 0:
        torch.save(results, Path(out_dir) / "weights.pt")


def test_initial_weights_are_the_same_at_every_zero_stage_and_tp_degree(tmp_path):
    from megatron_tinyllama.model.build import padded_vocab_size

    run_on_ranks(_worker, 2, str(tmp_path))
    results = torch.load(tmp_path / "weights.pt")
    reference = results[LAYOUTS[0]]
    vocab = 500
    assert padded_vocab_size(vocab, 1) == padded_vocab_size(vocab, 2)  # same full shapes
    drawn = [name for name, value in reference.items() if value.std() > 0]
    assert len(drawn) >= 6, drawn  # embedding, QKV, projections, MLP, output layer
    for layout in LAYOUTS:  # under zero.Init the master weights are bf16 tensors: drawn in fp32 anyway
        assert results[layout + ("drawn in",)] == ["torch.float32"], layout
    for layout in LAYOUTS[1:]:
        weights = results[layout]
        assert weights.keys() == reference.keys(), layout
        for name, value in reference.items():
            assert weights[name].shape == value.shape, (layout, name)
            assert torch.equal(weights[name], value), (layout, name, (weights[name] - value).abs().max())
    for name in drawn:
        value = reference[name]
        assert torch.equal(value, value.bfloat16().float())  # bf16 values (the engine's dtype)
        assert not torch.equal(results["other seed"][name], value), name  # a function of the seed
        std = value.std().item()
        assert 0.005 < std < 0.03, (name, std)  # init_method_std=0.02 (or the scaled output std)
