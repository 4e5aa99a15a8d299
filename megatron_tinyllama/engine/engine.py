"""Model + optimizer wrapped by DeepSpeed ZeRO-3, with megatron-core tensor parallelism.

DeepSpeed needs an ``mpu`` object to know the model-parallel and data-parallel groups; megatron-core's
``parallel_state`` has the groups but not all the names DeepSpeed calls, so :class:`MegatronMpu`
adapts them. Parameters are created under ``deepspeed.zero.Init`` on the data-parallel group, so a
rank never holds more than its shard of the full model (plus the layer being built). The optimizer
is torch's AdamW (fused on CUDA): megatron-core's optimizer and DDP wrapper are CUDA-only and
would fight DeepSpeed for ownership of gradients.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_tinyllama.config import JobConfig
from megatron_tinyllama.engine.ds_config import (
    BatchGeometry,
    batch_geometry,
    build_ds_config,
)
from megatron_tinyllama.model.build import build_model, use_fp32_rotary_frequencies
from megatron_tinyllama.model.kernels import KernelPlan, resolve_kernels
from megatron_tinyllama.parallel.init import DistributedEnv, initialize_node_local_group

logger = logging.getLogger(__name__)


class MegatronMpu:
    """megatron-core's parallel_state under the names DeepSpeed's ``mpu`` argument expects."""

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self._ps = parallel_state

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    # Model parallel is tensor parallel here: this stack has no pipeline parallelism.
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self._ps.get_data_parallel_group())


@dataclass
class TrainingEngine:
    """What the training loop drives."""

    engine: object  # deepspeed.DeepSpeedEngine
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    geometry: BatchGeometry
    ds_config: dict
    mpu: MegatronMpu
    kernels: KernelPlan
    """The speed levers as resolved on this machine (the loss backend is read from here)."""


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave 1-D tensors (norm gains) undecayed, as Megatron and GPT-NeoX do."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        # Under zero.Init a partitioned parameter reports its full shape in ds_shape.
        shape = getattr(param, "ds_shape", param.shape)
        (no_decay if len(shape) <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_engine(cfg: JobConfig, env: DistributedEnv) -> TrainingEngine:
    """Build the model (under ``zero.Init`` at ZeRO-3) and wrap it with DeepSpeed (process groups
    must exist)."""
    import deepspeed
    from megatron.core import parallel_state

    mpu = MegatronMpu()
    dp_size = parallel_state.get_data_parallel_world_size()
    ds_config = build_ds_config(cfg, dp_size, env.local_world_size)
    geometry = batch_geometry(cfg, dp_size)
    zero_stage = ds_config["zero_optimization"]["stage"]  # planned_layout's, 'auto' resolved
    zero3 = zero_stage == 3
    node_local_group = None
    hpz_members = ds_config["zero_optimization"].get("zero_hpz_partition_size", 1)
    if hpz_members > 1:
        tp = cfg.parallel.tensor_parallel_size
        node_local_group = initialize_node_local_group(tp, hpz_members * tp)
    init_context = (
        deepspeed.zero.Init(data_parallel_group=parallel_state.get_data_parallel_group(),
                            config_dict_or_path=ds_config, mpu=mpu,
                            zero_param_parallel_group=node_local_group)
        if zero3 else contextlib.nullcontext()
    )
    kernels = resolve_kernels(cfg.model, precision=cfg.train.precision,
                              tensor_parallel_size=cfg.parallel.tensor_parallel_size,
                              zero_stage=zero_stage)
    with init_context:
        # The initial weights are a function of the seed alone (fp32 CPU draws), also under
        # zero.Init, which would otherwise make megatron-core draw them in bf16 on the GPU.
        model = build_model(cfg.model, cfg.parallel.tensor_parallel_size, precision="fp32", kernels=kernels,
                            init_seed=cfg.parallel.seed)
    use_fp32_rotary_frequencies(model, cfg.model)  # zero.Init made them bf16 under bf16
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(model, cfg.optimizer.weight_decay),
        lr=cfg.optimizer.lr,
        betas=(cfg.optimizer.beta1, cfg.optimizer.beta2),
        eps=cfg.optimizer.eps,
        fused=torch.cuda.is_available(),
    )
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, mpu=mpu, dist_init_required=False
    )
    logger.info(
        "engine: ZeRO-%d, TP=%d, DP=%d, micro-batch %d x accumulation %d, hpZ %s, precision %s",
        zero_stage, cfg.parallel.tensor_parallel_size, dp_size, geometry.micro_batch_size,
        geometry.gradient_accumulation_steps,
        ds_config["zero_optimization"].get("zero_hpz_partition_size", "off"), cfg.train.precision,
    )
    return TrainingEngine(engine, engine.module, optimizer, geometry, ds_config, mpu, kernels)

