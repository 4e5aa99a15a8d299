"""The one map between our megatron-core state and Hugging Face Llama weights, and TP (un)sharding.

Everything that knows an HF tensor name lives here. Each :class:`Rule` pairs a megatron-core key
with one or more HF keys and gives ``split`` (ours -> HF) and ``join`` (HF -> ours); both
directions are derived from the same table, so they cannot drift apart.

Layout facts this encodes (each has a test):

* megatron-core fuses Q, K, V into ``linear_qkv`` laid out *per query group*:
  ``[q heads of group 0, k of group 0, v of group 0, q heads of group 1, ...]``;
  HF keeps ``q_proj``, ``k_proj``, ``v_proj`` separate.
* SwiGLU ``linear_fc1`` is ``[gate; up]``; under TP each rank holds ``[gate_r; up_r]``, so a
  merged fc1 is *not* the concatenation of the rank shards.
* Both sides apply RoPE as rotate-half (megatron ``rotary_interleaved=False``), so no permutation
  of Q/K rows is needed (Meta's original checkpoints are interleaved; HF's are not).
* The embedding and output layer are padded for TP (see ``padded_vocab_size``) and cut back here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_tinyllama.config import ModelConfig


class ConversionError(ValueError):
    """A checkpoint that does not match the expected architecture or shapes."""


@dataclass(frozen=True)
class Rule:
    """One tensor (or a fused group of tensors) and how it maps to HF."""

    mcore: str
    hf: tuple[str, ...]
    split: Callable[[torch.Tensor, ModelConfig], tuple[torch.Tensor, ...]] = lambda t, c: (t,)
    join: Callable[[tuple[torch.Tensor, ...], ModelConfig], torch.Tensor] = lambda ts, c: ts[0]
    tp_dim: Optional[int] = None
    """Dimension split across TP ranks (0: column-parallel, 1: row-parallel, None: replicated)."""
    per_layer: bool = False


def _qkv_split(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    groups, hd = cfg.num_query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    grouped = qkv.reshape(groups, (per_group + 2) * hd, -1)
    q, k, v = torch.split(grouped, [per_group * hd, hd, hd], dim=1)
    d_in = qkv.shape[-1]
    return q.reshape(-1, d_in).clone(), k.reshape(-1, d_in).clone(), v.reshape(-1, d_in).clone()


def _qkv_join(qkv: tuple[torch.Tensor, ...], cfg: ModelConfig) -> torch.Tensor:
    q, k, v = qkv
    groups, hd = cfg.num_query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    d_in = q.shape[-1]
    grouped = torch.cat(
        [q.reshape(groups, per_group * hd, d_in), k.reshape(groups, hd, d_in), v.reshape(groups, hd, d_in)],
        dim=1,
    )
    return grouped.reshape(-1, d_in)


def _fc1_split(fc1: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.clone(), up.clone()


def _fc1_join(gate_up: tuple[torch.Tensor, ...], cfg: ModelConfig) -> torch.Tensor:
    return torch.cat(gate_up, dim=0)


def _vocab_cut(t: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    return (t[: cfg.vocab_size].clone(),)


RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), split=_vocab_cut, tp_dim=0),
    Rule("decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",),
         per_layer=True),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.weight",
         ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
          "model.layers.{i}.self_attn.v_proj.weight"),
         split=_qkv_split, join=_qkv_join, tp_dim=0, per_layer=True),
    Rule("decoder.layers.{i}.self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",),
         tp_dim=1, per_layer=True),
    Rule("decoder.layers.{i}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
         per_layer=True),
    Rule("decoder.layers.{i}.mlp.linear_fc1.weight",
         ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
         split=_fc1_split, join=_fc1_join, tp_dim=0, per_layer=True),
    Rule("decoder.layers.{i}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",),
         tp_dim=1, per_layer=True),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), split=_vocab_cut, tp_dim=0),
)


def check_hf_compatible(cfg: ModelConfig) -> None:
    """HF ``LlamaForCausalLM`` has RMSNorm and no qk-norm: refuse other shapes clearly."""
    if cfg.normalization != "RMSNorm":
        raise ConversionError(
            f"model.normalization={cfg.normalization}: HF Llama supports RMSNorm only"
        )
    if cfg.qk_layernorm:
        raise ConversionError("model.qk_layernorm=true: HF Llama has no query/key normalisation")


def _expanded_rules(cfg: ModelConfig):
    for rule in RULES:
        if rule.mcore.startswith("output_layer") and not cfg.untie_embeddings:
            continue
        layers = range(cfg.num_layers) if rule.per_layer else (None,)
        for i in layers:
            fmt = (lambda s: s.format(i=i)) if rule.per_layer else (lambda s: s)
            yield rule, fmt(rule.mcore), tuple(fmt(h) for h in rule.hf)


def _pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    pad = torch.zeros(padded - t.shape[0], *t.shape[1:], dtype=t.dtype)
    return torch.cat([t, pad], dim=0)


def repad_vocab(full_state: dict[str, torch.Tensor], cfg: ModelConfig,
                padded_vocab: int) -> dict[str, torch.Tensor]:
    """A merged megatron-core state with its vocabulary rows cut to ``cfg.vocab_size`` and padded
    (with zeros) to ``padded_vocab``: the padding depends on the TP degree the state is split for."""
    out = dict(full_state)
    for rule in RULES:
        if rule.split is _vocab_cut and rule.mcore in out:
            out[rule.mcore] = _pad_vocab(out[rule.mcore][: cfg.vocab_size], padded_vocab)
    return out


def mcore_to_hf(full_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A TP-merged megatron-core state dict -> HF Llama tensors (vocabulary cut to cfg.vocab_size).

    Raises:
        ConversionError: a tensor is missing or has an unexpected shape.
    """
    check_hf_compatible(cfg)
    expected = expected_mcore_shapes(cfg)
    hf: dict[str, torch.Tensor] = {}
    for rule, key, hf_keys in _expanded_rules(cfg):
        if key not in full_state:
            raise ConversionError(f"missing tensor {key!r} in the model state")
        tensor = full_state[key]
        want = expected[key]
        if rule.split is _vocab_cut:  # padded rows beyond the vocabulary are allowed, then cut
            shape_ok = tuple(tensor.shape[1:]) == want[1:] and tensor.shape[0] >= want[0]
        else:
            shape_ok = tuple(tensor.shape) == want
        if not shape_ok:
            raise ConversionError(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {want}")
        parts = rule.split(tensor, cfg)
        hf.update(zip(hf_keys, parts))
    return hf


def hf_to_mcore(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab: int) -> dict[str, torch.Tensor]:
    """HF Llama tensors -> a TP-merged megatron-core state dict padded to ``padded_vocab`` rows.

    Raises:
        ConversionError: an HF tensor is missing, unexpected or of the wrong shape.
    """
    check_hf_compatible(cfg)
    hf_expected = expected_hf_shapes(cfg)
    ignored = {k for k in hf_state if k.endswith("rotary_emb.inv_freq")}
    if not cfg.untie_embeddings:
        ignored.add("lm_head.weight")  # tied: HF may store a copy of the embedding
    unexpected = sorted(set(hf_state) - set(hf_expected) - ignored)
    if unexpected:
        raise ConversionError(f"unexpected tensor(s) in the HF checkpoint: {unexpected[:5]}")
    full: dict[str, torch.Tensor] = {}
    for rule, key, hf_keys in _expanded_rules(cfg):
        parts = []
        for hf_key in hf_keys:
            if hf_key not in hf_state:
                raise ConversionError(f"missing tensor {hf_key!r} in the HF checkpoint")
            if tuple(hf_state[hf_key].shape) != hf_expected[hf_key]:
                raise ConversionError(
                    f"HF tensor {hf_key!r} has shape {tuple(hf_state[hf_key].shape)}, "
                    f"expected {hf_expected[hf_key]} for this config"
                )
            parts.append(hf_state[hf_key])
        tensor = rule.join(tuple(parts), cfg)
        if rule.split is _vocab_cut:
            tensor = _pad_vocab(tensor, padded_vocab)
        full[key] = tensor
    return full


def expected_mcore_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Unpadded shapes of the merged megatron-core tensors for ``cfg``."""
    return {key: _join_shapes(rule, [expected_hf_shapes(cfg)[h] for h in hf_keys])
            for rule, key, hf_keys in _expanded_rules(cfg)}


def _join_shapes(rule: Rule, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if len(shapes) == 1:
        return shapes[0]
    return (sum(s[0] for s in shapes),) + shapes[0][1:]


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, f, hd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if cfg.untie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (cfg.num_attention_heads * hd, d),
            p + "self_attn.k_proj.weight": (cfg.num_query_groups * hd, d),
            p + "self_attn.v_proj.weight": (cfg.num_query_groups * hd, d),
            p + "self_attn.o_proj.weight": (d, cfg.num_attention_heads * hd),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        })
    return shapes


# ---------------------------------------------------------------------------------------------
# Tensor-parallel sharding of the merged megatron-core state.

def _rule_for(key: str) -> Optional[Rule]:
    for rule in RULES:
        pattern = rule.mcore.split("{i}")
        if len(pattern) == 1 and key == rule.mcore:
            return rule
        if len(pattern) == 2 and key.startswith(pattern[0]) and key.endswith(pattern[1]):
            middle = key[len(pattern[0]): len(key) - len(pattern[1])]
            if middle.isdigit():
                return rule
    return None


def _is_fc1(rule: Rule) -> bool:
    return rule.split is _fc1_split


def tp_layout(key: str) -> tuple[str, bool]:
    """How TP ranks hold tensor ``key``: ``"replicated"``, ``"rows"`` (split along dim 0, in
    rank order), ``"fc1"`` (rows, each rank ``[gate_r; up_r]``) or ``"columns"`` (dim 1); and
    whether its rows are the vocabulary (padded for the TP degree). The rules of
    :func:`shard_for_tp` and :func:`merge_tp_shards`, for readers that fetch only a rank's rows.

    Raises:
        ConversionError: no rule for ``key``.
    """
    rule = _rule_for(key)
    if rule is None:
        raise ConversionError(f"no sharding rule for tensor {key!r}")
    if rule.tp_dim is None:
        kind = "replicated"
    elif _is_fc1(rule):
        kind = "fc1"
    else:
        kind = "rows" if rule.tp_dim == 0 else "columns"
    return kind, rule.split is _vocab_cut


def shard_for_tp(full: dict[str, torch.Tensor], tp_size: int) -> list[dict[str, torch.Tensor]]:
    """Split a merged megatron-core state into ``tp_size`` rank states (fc1 as [gate_r; up_r])."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
    for key, tensor in full.items():
        rule = _rule_for(key)
        if rule is None:
            raise ConversionError(f"no sharding rule for tensor {key!r}")
        if rule.tp_dim is None:
            pieces = [tensor] * tp_size
        elif _is_fc1(rule):
            gates, ups = (torch.chunk(t, tp_size, dim=0) for t in torch.chunk(tensor, 2, dim=0))
            pieces = [torch.cat([g, u], dim=0) for g, u in zip(gates, ups)]
        else:
            if tensor.shape[rule.tp_dim] % tp_size:
                raise ConversionError(
                    f"tensor {key!r} of shape {tuple(tensor.shape)} does not split {tp_size} ways"
                )
            pieces = torch.chunk(tensor, tp_size, dim=rule.tp_dim)
        for rank, piece in enumerate(pieces):
            shards[rank][key] = piece.clone()
    return shards


def merge_tp_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`shard_for_tp`: rank states -> one merged state."""
    keys = set(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != keys:
            diff = sorted(keys.symmetric_difference(shard))[:5]
            raise ConversionError(f"TP rank {rank} holds different tensors than rank 0: {diff}")
    full: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        rule = _rule_for(key)
        if rule is None:
            raise ConversionError(f"no merging rule for tensor {key!r}")
        pieces = [shard[key] for shard in shards]
        if rule.tp_dim is None:
            full[key] = pieces[0]
        elif _is_fc1(rule):
            gates, ups = zip(*(torch.chunk(p, 2, dim=0) for p in pieces))
            full[key] = torch.cat([torch.cat(gates, 0), torch.cat(ups, 0)], dim=0)
        else:
            full[key] = torch.cat(pieces, dim=rule.tp_dim)
    return full


def hf_config_dict(cfg: ModelConfig, torch_dtype: str = "float32",
                   bos_token_id: int = 1, eos_token_id: int = 2) -> dict:
    """The ``config.json`` of a ``LlamaForCausalLM`` equal to ``cfg``."""
    check_hf_compatible(cfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.seq_length,
        "rms_norm_eps": cfg.norm_epsilon,
        # Both spellings: transformers < 5 reads rope_theta + rope_scaling, 5 reads rope_parameters
        # (and converts the old keys too); they say the same.
        "rope_theta": cfg.rope_base,
        "rope_scaling": hf_rope_scaling(cfg),
        "rope_parameters": {"rope_theta": cfg.rope_base, **(hf_rope_scaling(cfg) or
                                                             {"rope_type": "default"})},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_method_std,
        "tie_word_embeddings": not cfg.untie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }


def hf_rope_scaling(cfg: ModelConfig) -> Optional[dict]:
    """HF's ``rope_scaling`` (and ``rope_parameters`` less ``rope_theta``) for ``cfg``; None when
    RoPE is unscaled."""
    from megatron_tinyllama.model.rope import LLAMA3_FIXED

    if cfg.rope_scaling == "none":
        return None
    out = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
    if cfg.rope_scaling == "llama3":
        out.update(LLAMA3_FIXED)
    return out


def _rope_scaling_from_hf(hf_cfg: dict, source: str) -> tuple[str, float]:
    """(``rope_scaling``, ``rope_scaling_factor``) of our config for an HF Llama ``config.json``.

    transformers 5 writes ``rope_parameters`` (with ``rope_theta`` inside), earlier versions
    ``rope_scaling`` (``type`` or ``rope_type``); either may be given, or both when they agree.

    Raises:
        ConversionError: a scaling megatron-core cannot compute (yarn, dynamic, longrope, ...,
            llama3 with other than its fixed parameters, partial rotary), naming the field.
    """
    from megatron_tinyllama.model.rope import LLAMA3_FIXED

    found = []
    for key in ("rope_parameters", "rope_scaling"):
        params = hf_cfg.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ConversionError(f"{source}: {key}={params!r} is not an object")
        kind = params.get("rope_type", params.get("type", "default"))
        found.append((key, params, kind))
    partial = hf_cfg.get("partial_rotary_factor", 1.0)
    for key, params, _ in found:
        partial = params.get("partial_rotary_factor", partial)
    if partial != 1.0:
        raise ConversionError(f"{source}: partial_rotary_factor={partial!r} is not supported "
                              "(Llama rotates the whole head: 1.0)")
    scaled = [(key, params, kind) for key, params, kind in found if kind != "default"]
    if not scaled:
        return "none", 1.0
    key, params, kind = scaled[0]
    for other_key, other, other_kind in scaled[1:]:
        if other_kind != kind or other.get("factor") != params.get("factor"):
            raise ConversionError(f"{source}: {key} ({kind}, factor {params.get('factor')}) and "
                                  f"{other_key} ({other_kind}, factor {other.get('factor')}) disagree")
    if kind not in ("linear", "llama3"):
        type_key = "rope_type" if "rope_type" in params else "type"
        raise ConversionError(
            f"{source}: {key}.{type_key}={kind!r} is not supported: megatron-core computes 'linear' "
            f"and 'llama3' RoPE scaling only ({', '.join(f'{k} {v}' for k, v in LLAMA3_FIXED.items())}"
            " for llama3); converting without it would give another model")
    factor = params.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor >= 1:
        raise ConversionError(f"{source}: {key}.factor={factor!r}: need a number >= 1 for "
                              f"{kind!r} RoPE scaling")
    if kind == "llama3":
        for name, fixed in LLAMA3_FIXED.items():
            if params.get(name) != fixed:
                raise ConversionError(
                    f"{source}: {key}.{name}={params.get(name)!r} is not supported: megatron-core's "
                    f"llama3 RoPE scaling fixes it at {fixed}")
    for name in ("attention_factor", "mscale", "mscale_all_dim"):
        if params.get(name) not in (None, 1, 1.0):
            raise ConversionError(f"{source}: {key}.{name}={params.get(name)!r} is not supported "
                                  f"with {kind!r} RoPE scaling")
    return kind, float(factor)


def model_config_from_hf(hf_cfg: dict, source: str = "config.json") -> ModelConfig:
    """Our :class:`ModelConfig` for an HF Llama ``config.json`` (other architectures refused)."""
    archs = hf_cfg.get("architectures") or []
    if hf_cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise ConversionError(
            f"{source}: model_type={hf_cfg.get('model_type')!r}, architectures={archs}: "
            "only Llama checkpoints (model_type 'llama') can be converted"
        )
    for field_name, allowed in (("hidden_act", ("silu", None)), ("attention_bias", (False, None)),
                                ("mlp_bias", (False, None))):
        if hf_cfg.get(field_name) not in allowed:
            raise ConversionError(
                f"{source}: {field_name}={hf_cfg.get(field_name)!r} is not supported (need {allowed[0]!r})"
            )
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in hf_cfg]
    if missing:
        raise ConversionError(f"{source}: missing field(s) {missing}")
    heads = hf_cfg["num_attention_heads"]
    rope_theta = hf_cfg.get("rope_theta")
    if rope_theta is None:  # transformers 5 nests it under rope_parameters
        rope_theta = (hf_cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    rope_scaling, rope_scaling_factor = _rope_scaling_from_hf(hf_cfg, source)
    head_dim = hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // heads
    if head_dim * heads != hf_cfg["hidden_size"]:
        raise ConversionError(f"{source}: head_dim={head_dim} x heads != hidden_size is not supported")
    return ModelConfig(
        hidden_size=hf_cfg["hidden_size"],
        ffn_hidden_size=hf_cfg["intermediate_size"],
        num_layers=hf_cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=hf_cfg.get("num_key_value_heads") or heads,
        vocab_size=hf_cfg["vocab_size"],
        seq_length=hf_cfg.get("max_position_embeddings", 2048),
        normalization="RMSNorm",
        norm_epsilon=hf_cfg.get("rms_norm_eps", 1e-6),
        rope_base=float(rope_theta),
        rope_scaling=rope_scaling,
        rope_scaling_factor=rope_scaling_factor,
        untie_embeddings=not hf_cfg.get("tie_word_embeddings", False),
        init_method_std=hf_cfg.get("initializer_range", 0.02),
    )
