"""Whether a checkpoint fits the recipe that wants to start from it.

This module owns the comparison of what a checkpoint was written with (its model config, its
tensor/data-parallel layout, its tokenizer) against the recipe about to use it. It reads only small
JSON files, so the trainer runs it before anything is built, and every difference is named
(``model.num_attention_heads: checkpoint 8, recipe 16``) rather than surfacing later as a shape
error deep in DeepSpeed or, worse, as a run that trains on with the wrong head layout.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

from megatron_tinyllama.config import JobConfig, ModelConfig

# Fields that change what the weights mean. attention_backend, activation_checkpointing,
# init_method_std and z_loss_weight change how a model is computed or trained, not its tensors.
MODEL_SHAPE_FIELDS = (
    "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
    "vocab_size", "normalization", "norm_epsilon", "rope_base", "untie_embeddings", "qk_layernorm",
    "rope_scaling", "rope_scaling_factor",
)
# Fields added after checkpoints were first written: absent from a saved config means the value
# every model had before them.
_ADDED_LATER = {"rope_scaling": "none", "rope_scaling_factor": 1.0}


def model_differences(saved: dict[str, Any], recipe: ModelConfig, *,
                      include_seq_length: bool = False) -> list[str]:
    """``model.<field>: checkpoint X, recipe Y`` for each architectural field that differs."""
    fields = MODEL_SHAPE_FIELDS + (("seq_length",) if include_seq_length else ())
    diffs = []
    for name in fields:
        mine = getattr(recipe, name)
        theirs = saved.get(name, _ADDED_LATER.get(name))
        if theirs is None or _differs(theirs, mine):
            diffs.append(f"model.{name}: checkpoint {theirs!r}, recipe {mine!r}")
    return diffs


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) != float(b)
    return a != b


def file_fingerprint(path: Optional[str]) -> Optional[str]:
    """A short content hash of a file (the tokenizer model), or None when there is no file."""
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def tokenizer_differences(saved: dict[str, Any], cfg: JobConfig) -> list[str]:
    """The tokenizer the checkpoint was trained with against the recipe's, by content."""
    theirs = saved.get("tokenizer_fingerprint")
    mine = file_fingerprint(cfg.data.tokenizer_model)
    if theirs and mine and theirs != mine:
        saved_path = saved.get("config", {}).get("data", {}).get("tokenizer_model")
        return [f"data.tokenizer_model: checkpoint trained with {saved_path} ({theirs}), recipe "
                f"names {cfg.data.tokenizer_model} ({mine}), a different tokenizer"]
    return []


# Fields that decide which sample each global index is (data/blend.py, data/loader.py). The run's
# length (train.train_tokens) and the batch size do not: a run trained longer extends its order.
DATA_ORDER_FIELDS = ("data.blend", "data.mixture_warmup", "data.seed")


def data_order_differences(saved_cfg: dict[str, Any], cfg: JobConfig) -> list[str]:
    """Recipe changes that make the samples from here on differ from the ones the checkpointed
    run had planned: the blend, its warm-up, or the data seed (``data.seed``, else
    ``parallel.seed``)."""
    mine = cfg.to_dict()
    diffs = []
    for dotted in DATA_ORDER_FIELDS:
        section, key = dotted.split(".")
        theirs, value = saved_cfg.get(section, {}).get(key), mine[section][key]
        if key == "seed":  # compared as used: None means parallel.seed
            theirs = theirs if theirs is not None else saved_cfg.get("parallel", {}).get("seed")
            value = value if value is not None else cfg.parallel.seed
            if _differs(theirs, value):
                diffs.append(f"data seed (data.seed, else parallel.seed): {theirs!r} -> {value!r}")
        elif _differs(_plain(theirs), _plain(value)):
            diffs.append(f"{dotted}: {theirs!r} -> {value!r}")
    return diffs


def other_differences(saved_cfg: dict[str, Any], cfg: JobConfig,
                      sections: tuple[str, ...] = ("data", "optimizer", "train"),
                      exclude: tuple[str, ...] = ()) -> list[str]:
    """Recipe fields that differ but may legitimately change on resume (logged, not refused);
    ``exclude`` names dotted fields reported elsewhere."""
    mine = cfg.to_dict()
    diffs = []
    for section in sections:
        for key, value in mine.get(section, {}).items():
            theirs = saved_cfg.get(section, {}).get(key)
            if f"{section}.{key}" not in exclude and _differs(_plain(theirs), _plain(value)):
                diffs.append(f"{section}.{key}: {theirs!r} -> {value!r}")
    return diffs


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# The layout a checkpoint was written at, as saved in its trainer_state.json ("layout") and as an
# engine runs: what DeepSpeed's shards depend on. Node-local sharding counts data-parallel ranks
# per group (1 = off).
LAYOUT_FIELDS = (("data_parallel_size", "DP"), ("tensor_parallel_size", "TP"), ("zero_stage", "ZeRO"),
                 ("node_local_ranks", "node-local sharding"))


def saved_layout(payload: dict[str, Any]) -> dict[str, Optional[int]]:
    """The layout a checkpoint was written at; for checkpoints older than the ``layout`` record it
    is derived from the saved recipe and world size (node-local sharding then unknown: None)."""
    if isinstance(payload.get("layout"), dict):
        return {name: payload["layout"].get(name) for name, _ in LAYOUT_FIELDS}
    parallel = payload.get("config", {}).get("parallel", {})
    tp, world = parallel.get("tensor_parallel_size"), payload.get("world_size")
    dp = world // tp if world and tp else None
    stage = parallel.get("zero_stage")
    if stage is not None and dp:
        from megatron_tinyllama.engine.ds_config import auto_zero_stage

        stage = auto_zero_stage(stage, dp)
    return {"data_parallel_size": dp, "tensor_parallel_size": tp, "zero_stage": stage, "node_local_ranks": None}


def layout_change(saved: dict[str, Optional[int]], running: dict[str, int]) -> list[str]:
    """``DP 4 -> 2``, ``TP 1 -> 2``... for each layout field that differs ([] when the same).
    A field the checkpoint does not record is not compared."""
    def shown(name: str, value) -> str:
        return "off" if name == "node_local_ranks" and value == 1 else str(value)

    return [f"{label} {shown(name, saved[name])} -> {shown(name, running[name])}"
            for name, label in LAYOUT_FIELDS
            if saved.get(name) is not None and saved[name] != running[name]]
