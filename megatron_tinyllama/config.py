"""Typed configuration of a job: one frozen dataclass per concern, loaded from YAML.

This module owns every knob a recipe can turn. A recipe file is a YAML (or JSON) mapping whose
top-level sections match the fields of :class:`JobConfig`; ``section.field=value`` overrides from
the command line are cast to the field's type. An unknown key, a wrong type or an inconsistent
value is an error that names the file and the dotted field. Builders take only their slice
(``build_model(cfg.model, ...)``); nothing reads global state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be turned into a valid :class:`JobConfig`."""


def _require(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` unless ``ok``. Written as ``_require(x >= 0, ...)`` so that a NaN,
    which fails every comparison, is refused too."""
    if not ok:
        raise ConfigError(message)


def _check_range(section: str, name: str, value: float, *, low: Optional[float] = None,
                 high: Optional[float] = None, low_open: bool = False, high_open: bool = False) -> None:
    """``section.name`` must be finite and inside the given bounds (closed unless ``*_open``)."""
    where = f"{section}.{name}={value!r}"
    _require(isinstance(value, (int, float)) and math.isfinite(value), f"{where}: must be a finite number")
    if low is not None:
        _require(value > low if low_open else value >= low, f"{where}: must be {'>' if low_open else '>='} {low}")
    if high is not None:
        _require(value < high if high_open else value <= high,
                 f"{where}: must be {'<' if high_open else '<='} {high}")


# init=False: the constructor below resolves ``preset`` before the fields are set, so a preset
# means the same in Python as in a recipe file.
@dataclass(frozen=True, kw_only=True, init=False)
class ModelConfig:
    """Architecture of a decoder-only Llama-style transformer.

    Start from a named preset and override single fields, in a recipe (``preset: tinyllama-1.1b``)
    or in Python (``ModelConfig.from_preset("tinyllama-debug", vocab_size=1024)``, or equally
    ``ModelConfig(preset="tinyllama-debug", vocab_size=1024)``). A field given explicitly wins over
    the preset's value, which wins over the defaults below (the 1.1B shape).
    """

    preset: Optional[str] = None
    """Name in :mod:`megatron_tinyllama.model.presets`; its values fill the fields not given."""
    hidden_size: int = 2048
    """Width of the residual stream."""
    ffn_hidden_size: int = 5632
    """Inner width of the SwiGLU MLP (each of gate and up projections)."""
    num_layers: int = 22
    num_attention_heads: int = 32
    """Query heads."""
    num_query_groups: int = 4
    """Key/value heads (GQA groups). Equal to num_attention_heads for plain multi-head attention."""
    vocab_size: int = 32000
    """Tokenizer vocabulary; the embedding is padded for tensor parallelism and cut back on export."""
    seq_length: int = 2048
    """Context length in tokens."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    """RoPE context extension, as HF Llama's ``rope_parameters.rope_type``: 'linear' divides
    positions by ``rope_scaling_factor`` (megatron-core's seq_len_interpolation_factor); 'llama3'
    divides the low frequencies by it and blends the middle band (megatron-core's rope_scaling,
    low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192). See
    megatron_tinyllama/model/rope.py."""
    rope_scaling_factor: float = 1.0
    """Factor of ``rope_scaling``; 1.0 when it is 'none'."""
    untie_embeddings: bool = True
    """Separate input embedding and output projection (TinyLlama and Llama 2 do not tie them)."""
    qk_layernorm: bool = False
    """Normalise queries and keys per head before RoPE (the over-training testbed uses it)."""
    z_loss_weight: float = 0.0
    """Weight of the z-loss, mean of log(sum(exp(logits)))^2; 1e-4 in the over-training testbed."""
    init_method_std: float = 0.02
    attention_backend: Literal["auto", "sdpa", "flash_attn", "math"] = "auto"
    """Core attention: 'auto' picks flash-attn when importable on GPU, else torch SDPA."""
    activation_checkpointing: bool = False
    """Recompute each transformer layer in backward to save activation memory."""
    # Speed levers. Each computes the same function as its plain path (tests compare loss and
    # gradients); 'auto' picks the fastest backend this machine can run and the log names it
    # ("norm backend: ..."). Rules in megatron_tinyllama/model/kernels.py; measurements in
    # docs/performance.md.
    norm_backend: Literal["auto", "torch", "compiled", "liger", "te", "apex"] = "auto"
    """RMSNorm kernel: torch's, a torch.compile'd one, liger-kernel's, Transformer Engine's or apex's."""
    swiglu_backend: Literal["auto", "torch", "fused"] = "auto"
    """SwiGLU: torch ops, or megatron-core's fused kernel (bias_activation_fusion, jit-compiled)."""
    rope_backend: Literal["auto", "torch", "compiled", "liger"] = "auto"
    """RoPE: megatron-core's unfused ops, or one kernel (compiled or liger) inside core attention;
    angles are computed from fp32 positions in every backend."""
    cross_entropy_backend: Literal["auto", "plain", "chunked", "megatron_fused", "liger"] = "auto"
    """Loss: 'plain' takes an fp32 copy of all logits; 'chunked' works through the tokens in chunks
    and writes the gradient into the logits' storage; 'megatron_fused' is megatron-core's fused
    vocab-parallel kernel (bf16 only); 'liger' liger-kernel's (TP=1). All keep z-loss and leave the
    vocabulary padding out of the softmax."""
    gqa_backend: Literal["auto", "native", "repeat"] = "auto"
    """'native' lets attention read the shared K/V heads in place (SDPA enable_gqa, flash-attn);
    'repeat' copies them per query head first."""
    torch_compile: Literal["auto", "layers", "none"] = "auto"
    """torch.compile every transformer layer (fuses norms, RoPE, SwiGLU and residual adds);
    'auto' does below ZeRO-3 on CUDA."""

    def __init__(self, **fields: Any) -> None:
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise TypeError(f"ModelConfig got unknown field(s) {unknown}; known: {sorted(names)}")
        if fields.get("preset") is not None:
            from megatron_tinyllama.model.presets import preset_values

            fields = {**preset_values(str(fields["preset"])), **fields}
        for f in dataclasses.fields(self):
            if f.name in fields:
                value = fields[f.name]
            else:
                value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            object.__setattr__(self, f.name, value)
        self.__post_init__()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """Preset ``name`` with ``overrides`` applied (an unknown name lists the known ones).

        Raises:
            ConfigError: unknown preset, or overrides that make an invalid shape.
        """
        return cls(**overrides, preset=name)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                     "num_query_groups", "vocab_size", "seq_length"):
            _check_range("model", name, getattr(self, name), low=1)
        _check_range("model", "norm_epsilon", self.norm_epsilon, low=0, low_open=True)
        _check_range("model", "rope_base", self.rope_base, low=1, low_open=True)
        if self.rope_scaling not in ("none", "linear", "llama3"):
            raise ConfigError(f"model.rope_scaling={self.rope_scaling!r}: expected 'none', 'linear' "
                              "or 'llama3' (the scalings megatron-core computes)")
        _check_range("model", "rope_scaling_factor", self.rope_scaling_factor, low=1)
        if self.rope_scaling == "none" and self.rope_scaling_factor != 1.0:
            raise ConfigError(f"model.rope_scaling_factor={self.rope_scaling_factor} has no effect "
                              "with model.rope_scaling='none': set rope_scaling or drop the factor")
        _check_range("model", "z_loss_weight", self.z_loss_weight, low=0)
        _check_range("model", "init_method_std", self.init_method_std, low=0, low_open=True)
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_query_groups={self.num_query_groups} must divide "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} must divide "
                f"model.hidden_size={self.hidden_size}"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError("model: head dimension must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self, padded_vocab_size: Optional[int] = None) -> int:
        """Exact parameter count of the model this config builds (unpadded vocab by default)."""
        vocab = padded_vocab_size or self.vocab_size
        d, kv = self.hidden_size, self.num_query_groups * self.head_dim
        norm = d if self.normalization == "RMSNorm" else 2 * d
        attn = d * (d + 2 * kv) + d * d
        mlp = 2 * d * self.ffn_hidden_size + self.ffn_hidden_size * d
        qk_norm = 2 * (self.head_dim if self.normalization == "RMSNorm" else 2 * self.head_dim)
        layer = attn + mlp + 2 * norm + (qk_norm if self.qk_layernorm else 0)
        embeddings = vocab * d * (2 if self.untie_embeddings else 1)
        return self.num_layers * layer + norm + embeddings


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the model and the data are split over ranks."""

    tensor_parallel_size: int = 1
    """megatron-core tensor parallelism; ranks of one TP group are consecutive (same node)."""
    zero_stage: Literal["auto", 0, 1, 2, 3] = "auto"
    """DeepSpeed ZeRO stage. 'auto': ZeRO-1 when the data-parallel size is 1, else the stage with
    the shortest predicted step among those predicted to fit the device's memory
    (engine/ds_config.choose_auto_stage; ``tinyllama-layout`` prints the comparison). With one
    data-parallel rank there is nothing to shard, and ZeRO-1 under bf16 is DeepSpeed's
    BF16_Optimizer (fp32 master weights, fp32 gradient accumulation, as ZeRO-3) without ZeRO-3's
    per-layer parameter hooks; tests/distributed/test_zero_stages.py checks that they train alike.
    Stage 0 is fp32/fp16 only: DeepSpeed's stage 0 in bf16 has no fp32 master weights."""
    hpz_partition_size: int = 1
    """ZeRO++ hierarchical partitioning: keep a secondary parameter shard within groups of this many
    ranks (GPUs per node for TinyLlama v1.1's node-local sharding). 1 disables it; 0 means the
    launcher's local world size."""
    ds_config: Optional[str] = None
    """Base DeepSpeed JSON (in ds_configs/); batch, precision, ZeRO stage are filled from this config."""
    seed: int = 1234
    """Seed for weights (identical across TP layouts), dropout and data order."""
    expected_world_size: Optional[int] = None
    """Ranks the job must run on (nodes x GPUs per node). When set, a launcher that started
    another number stops at start: deepspeed runs on this machine's devices alone, with only a
    warning, when its --hostfile is missing. None accepts any world."""

    def __post_init__(self) -> None:
        _check_range("parallel", "tensor_parallel_size", self.tensor_parallel_size, low=1)
        _check_range("parallel", "hpz_partition_size", self.hpz_partition_size, low=0)
        if self.expected_world_size is not None:
            _check_range("parallel", "expected_world_size", self.expected_world_size, low=1)


@dataclass(frozen=True, kw_only=True)
class MixtureWarmupConfig:
    """Mixture weights that move linearly from the stage's start blend to ``blend`` over tokens.

    TinyLlama v1.1's continual domain pretraining raises a domain's share over the first 6B tokens.
    Tokens are counted as ``sample_index * seq_length`` in this run's global sample order.
    """

    start_weights: tuple[float, ...] = ()
    """Weights at the start of the stage, one per dataset of ``data.blend``, in the same order."""
    warmup_tokens: int = 0
    """Tokens (counted from the start of the stage) over which weights move to data.blend's."""
    start_tokens: Optional[int] = None
    """Position in the global sample order (sample index x seq_length) at which the warm-up starts;
    start_weights apply before it. None: where this stage starts (sample 0 of a fresh run, the
    checkpoint's position for ``checkpoint.continue_from``)."""

    def __post_init__(self) -> None:
        if not self.start_weights:
            raise ConfigError("data.mixture_warmup.start_weights: give one weight per dataset")
        _require(all(w >= 0 and math.isfinite(w) for w in self.start_weights)
                 and sum(self.start_weights) > 0,
                 "data.mixture_warmup.start_weights must be finite, >= 0, with a positive sum")
        _check_range("data.mixture_warmup", "warmup_tokens", self.warmup_tokens, low=0)
        if self.start_tokens is not None:
            _check_range("data.mixture_warmup", "start_tokens", self.start_tokens, low=0)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where training samples come from and how they are drawn."""

    blend: tuple[str, ...] = ()
    """Megatron-style weighted prefixes: ('0.7', 'data/slim_text_document', '0.3', 'data/star')
    or a single prefix. The string form '0.7 a 0.3 b' is accepted too."""
    valid_blend: tuple[str, ...] = ()
    """Held-out datasets for validation loss; empty disables validation."""
    mixture_warmup: Optional[MixtureWarmupConfig] = None
    tokenizer_model: Optional[str] = None
    """sentencepiece .model (or HF tokenizer.json) used to build the data; copied to HF exports."""
    cache_dir: Optional[str] = None
    """Where sample indices are cached; defaults to beside the first dataset."""
    num_workers: Optional[int] = None
    """DataLoader worker processes per rank (0: samples are read in the training process).
    None (auto): 2 with CUDA, so reading and collating overlap the GPU's work; 0 without, where the
    ranks share the CPU cores."""
    pin_memory: Optional[bool] = None
    """Collate batches into page-locked memory, so the copy to the GPU runs asynchronously.
    None (auto): on when CUDA is available."""
    seed: Optional[int] = None
    """Data-order seed; defaults to parallel.seed."""

    def __post_init__(self) -> None:
        from megatron_tinyllama.data.blend import parse_blend

        for name in ("blend", "valid_blend"):
            value = getattr(self, name)
            if isinstance(value, str):  # built in Python with the string form
                object.__setattr__(self, name, tuple(value.split()))
            if getattr(self, name):
                try:
                    parse_blend(getattr(self, name))
                except ValueError as err:
                    raise ConfigError(f"data.{name}: {err}") from None
        if self.mixture_warmup is not None:
            if not self.blend:
                raise ConfigError("data.mixture_warmup needs data.blend")
            prefixes, weights = parse_blend(self.blend)
            if weights is None and len(prefixes) > 1:
                raise ConfigError("data.mixture_warmup needs explicit weights in data.blend")
            if len(self.mixture_warmup.start_weights) != len(prefixes):
                raise ConfigError(
                    f"data.mixture_warmup.start_weights has {len(self.mixture_warmup.start_weights)}"
                    f" weights for {len(prefixes)} datasets in data.blend")
        if self.num_workers is not None:
            _check_range("data", "num_workers", self.num_workers, low=0)


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW and the learning-rate schedule, indexed by tokens so batch-size changes keep the curve."""

    lr: float = 4e-4
    min_lr: float = 4e-5
    warmup_tokens: int = 2000 * 2048 * 1024
    """Linear warm-up length (TinyLlama v1: 2000 steps of ~2M tokens)."""
    decay_tokens: Optional[int] = None
    """Cosine decay ends here (defaults to train.train_tokens); constant min_lr afterwards."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _check_range("optimizer", "lr", self.lr, low=0)
        _check_range("optimizer", "min_lr", self.min_lr, low=0)
        _require(self.min_lr <= self.lr, f"optimizer.min_lr={self.min_lr} exceeds optimizer.lr={self.lr}")
        _check_range("optimizer", "warmup_tokens", self.warmup_tokens, low=0)
        if self.decay_tokens is not None:
            _check_range("optimizer", "decay_tokens", self.decay_tokens, low=0, low_open=True)
        for name in ("beta1", "beta2"):
            _check_range("optimizer", name, getattr(self, name), low=0, high=1, high_open=True)
        _check_range("optimizer", "eps", self.eps, low=0, low_open=True)
        _check_range("optimizer", "weight_decay", self.weight_decay, low=0)
        _check_range("optimizer", "grad_clip", self.grad_clip, low=0)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Length of the run, batch geometry, precision and failure handling."""

    train_tokens: int = 3 * 10**12
    global_batch_tokens: int = 2048 * 1024
    """Tokens per optimizer step over all data-parallel ranks (micro x accumulation x DP x seq)."""
    micro_batch_size: int = 8
    """Sequences per data-parallel rank per forward pass."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    max_consecutive_nonfinite: int = 5
    """A NaN/inf loss skips its step; this many in a row halt the run."""
    start_tokens: int = 0
    """For a stage started from weights only (``checkpoint.init_from``): tokens consumed by earlier
    stages, so the LR schedule continues from here while the data order starts at sample 0. A stage
    started with ``checkpoint.continue_from`` takes its token count from the checkpoint instead."""

    stop_after_minutes: Optional[float] = None
    """Save a checkpoint and stop (exit 3) after this much wall time, before an allocation ends;
    SIGUSR1 or SIGTERM to any rank does the same. The same command resumes."""
    stall_timeout_minutes: Optional[float] = 10.0
    """A step, evaluation or save that makes no progress this long (a stopped or hung rank, a stuck
    file system) ends the job: the rank names who stalled and exits 4 (None: wait for the
    process-group timeout, 30 min). Counts the first step's compilation too."""

    def __post_init__(self) -> None:
        if self.stop_after_minutes is not None:
            _check_range("train", "stop_after_minutes", self.stop_after_minutes, low=0, low_open=True)
        if self.stall_timeout_minutes is not None:
            _check_range("train", "stall_timeout_minutes", self.stall_timeout_minutes, low=0, low_open=True)
        _check_range("train", "train_tokens", self.train_tokens, low=0, low_open=True)
        _check_range("train", "global_batch_tokens", self.global_batch_tokens, low=1)
        _check_range("train", "micro_batch_size", self.micro_batch_size, low=1)
        _check_range("train", "max_consecutive_nonfinite", self.max_consecutive_nonfinite, low=1)
        _check_range("train", "start_tokens", self.start_tokens, low=0)
        _require(self.start_tokens < self.train_tokens,
                 f"train.start_tokens={self.start_tokens} must be below train.train_tokens={self.train_tokens}")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where a run saves, and what it starts from.

    A run whose ``save_dir`` holds a complete checkpoint always resumes from it (the same recipe,
    exactly). Otherwise it starts from ``continue_from`` (a previous stage: full training state),
    else from ``init_from`` (weights only), else from a random initialisation.
    """

    save_dir: Optional[str] = None
    save_interval_steps: int = 1000
    continue_from: Optional[str] = None
    """A previous stage's save_dir (or one of its checkpoint directories): weights, fp32 master
    weights, optimizer state, token count and data position carry over; the data blend, batch size
    and run length may change, and so may the layout (see ``reshardable``). Model shape and
    tokenizer must match."""
    init_from: Optional[str] = None
    """Weights only (a converted HF model, a model directory, or a run's save_dir at any TP degree);
    optimizer and data start fresh (see ``train.start_tokens``)."""
    keep_last: int = 2
    """Complete checkpoints kept in save_dir (older ones of this run are deleted); 0 keeps all."""
    save_at_end: bool = True
    tp_replica_tolerance: float = 0.0
    """Largest difference allowed between tensor-parallel ranks' copies of a replicated parameter
    (norm gains), checked at each checkpoint; they are bitwise equal when training is correct."""
    reshardable: bool = True
    """Kept for recipes written before per-rank checkpoints, which are always layout-free (a run
    resumes on another data-parallel size, TP degree, ZeRO stage or node-local sharding); no
    effect."""
    background_save: bool = True
    """Write checkpoints in the background: training waits only for the copy of each rank's state
    to host memory (about 12 bytes per parameter it holds, held until the write ends); the next
    save, the end of the run and a stop wait for the write. False: every save is written before
    training goes on."""

    def __post_init__(self) -> None:
        _check_range("checkpoint", "save_interval_steps", self.save_interval_steps, low=1)
        _check_range("checkpoint", "keep_last", self.keep_last, low=0)
        _check_range("checkpoint", "tp_replica_tolerance", self.tp_replica_tolerance, low=0)
        _require(not (self.continue_from and self.init_from),
                 "checkpoint.continue_from and checkpoint.init_from are exclusive: continue a "
                 "previous stage with its full state, or start from weights only")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    log_interval_steps: int = 10
    tensorboard_dir: Optional[str] = None
    eval_interval_steps: int = 1000
    eval_tokens: int = 2048 * 256
    """Tokens per validation pass."""
    peak_tflops_per_device: Optional[float] = None
    """For MFU; by default guessed from the device name (989 for H100/H200 bf16)."""
    forecast: bool = True
    """At every evaluation, once ``forecast_min_points`` validation losses past warm-up exist, fit
    the loss-curve law on them, log the forecast final loss and the live loss's distance from the
    band, and warn when the loss leaves it (train/forecast_live.py)."""
    forecast_min_points: int = 8
    """Validation losses past warm-up needed before the first forecast."""
    forecast_tolerance: float = 0.02
    """Relative margin added to each side of the forecast band before a loss counts as outside."""
    forecast_batch_exponent: float = 1.0
    """How a stage at another batch counts in the forecast: a step of k times the first stage's
    batch is k^this reference steps (1 per token; 0.5 Adam's square-root rule, docs/forecast.md)."""

    def __post_init__(self) -> None:
        _check_range("logging", "forecast_min_points", self.forecast_min_points, low=5)
        _check_range("logging", "forecast_tolerance", self.forecast_tolerance, low=0)
        _check_range("logging", "forecast_batch_exponent", self.forecast_batch_exponent, low=0,
                     high=1)
        _check_range("logging", "log_interval_steps", self.log_interval_steps, low=1)
        _check_range("logging", "eval_interval_steps", self.eval_interval_steps, low=1)
        _check_range("logging", "eval_tokens", self.eval_tokens, low=1)
        if self.peak_tflops_per_device is not None:
            _check_range("logging", "peak_tflops_per_device", self.peak_tflops_per_device, low=0,
                         low_open=True)


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """Where this run sits in a multi-stage recipe (TinyLlama v1.1: three stages, three variants).

    Recorded in every checkpoint with the rest of the recipe; ``tinyllama-pipeline`` runs the
    stages in order and checks these numbers.
    """

    number: int = 1
    count: int = 1
    variant: Optional[str] = None
    """e.g. 'general', 'math_code', 'chinese' (None for a single-stage run)."""

    def __post_init__(self) -> None:
        _check_range("stage", "count", self.count, low=1)
        _check_range("stage", "number", self.number, low=1, high=self.count)


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """Everything one training run needs; saved next to its checkpoints."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    stage: StageConfig = field(default_factory=StageConfig)

    def __post_init__(self) -> None:
        if self.checkpoint.continue_from and self.train.start_tokens:
            raise ConfigError(
                "train.start_tokens is for a stage started with checkpoint.init_from; with "
                "checkpoint.continue_from the token count comes from the checkpoint")
        if self.train.global_batch_tokens % self.model.seq_length:
            raise ConfigError(
                f"train.global_batch_tokens={self.train.global_batch_tokens} is not a multiple of "
                f"model.seq_length={self.model.seq_length}"
            )

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step."""
        return self.train.global_batch_tokens // self.model.seq_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading: nested dicts -> dataclasses, with casting and errors that name the field.


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _cast(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where}: may not be null")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or str(value) == str(choice):
                return choice
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
    if origin is tuple:
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_cast(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _cast(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        named = not where or str(err).startswith(f"{where}.")  # the message names the field already
        raise ConfigError(str(err) if named else f"{where}: {err}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Turn ``['train.micro_batch_size=4', ...]`` into (dotted key, YAML-parsed value) pairs."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        parsed.append((key.lstrip("-"), yaml.safe_load(raw) if raw else ""))
    return parsed


def config_from_dict(data: dict[str, Any], overrides: list[str] = (), source: str = "") -> JobConfig:
    """Build a :class:`JobConfig` from a nested mapping plus dotted overrides."""
    tree = json.loads(json.dumps(data or {}))  # deep copy, plain types
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        return _build(JobConfig, tree, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}" if source else str(err)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice.

    PyYAML keeps the last value silently, so a recipe with a stray second ``model:`` section would
    train another shape. Keys merged in with ``<<`` may still be overridden, as YAML intends.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: PyYAML's own error names it
                    continue
                if first is not key_node:
                    where = node.start_mark.name
                    raise ConfigError(
                        f"{where}:{key_node.start_mark.line + 1}: duplicate key {key!r} (first at "
                        f"{where}:{first.start_mark.line + 1}); a recipe names each key once")
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, name: str) -> Any:
    """Parse recipe text; duplicate keys are a :class:`ConfigError` naming ``name:line`` of both."""
    loader = _UniqueKeyLoader(text)
    loader.name = name  # the marks (and so our messages and PyYAML's) name the file
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_config(path: Union[str, Path], overrides: list[str] = ()) -> JobConfig:
    """Load a recipe file (YAML or JSON) and apply ``section.field=value`` overrides."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read recipe ({err.strerror})") from None
    try:
        data = _load_yaml(text, str(path)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    return config_from_dict(data, overrides, source=str(path))


def save_config(cfg: JobConfig, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))
