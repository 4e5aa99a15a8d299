"""Checkpoint conversion to and from Hugging Face Llama directories (and the two console scripts).

* :func:`convert_to_hf`: our model directory, or a training run's save directory (its ``latest``
  checkpoint), at any TP degree -> ``config.json``, ``generation_config.json``,
  ``model.safetensors`` and, given a sentencepiece model, tokenizer files that ``AutoTokenizer``
  loads.
* :func:`convert_from_hf`: an HF Llama directory (e.g. a released TinyLlama) -> our model
  directory at a chosen TP degree, to continue pretraining from (``checkpoint.init_from``).

Output directories are written under a temporary name and renamed at the end: on any error nothing
is left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

from megatron_tinyllama.checkpoint.hf import (
    ConversionError,
    check_hf_compatible,
    hf_config_dict,
    hf_to_mcore,
    mcore_to_hf,
    merge_tp_shards,
    model_config_from_hf,
    shard_for_tp,
)
from megatron_tinyllama.checkpoint.native import atomic_directory, save_model_checkpoint
# A model directory or a per-rank training checkpoint.
from megatron_tinyllama.checkpoint.per_rank import load_model_checkpoint, read_model_index
# checkpoint.training owns the layout of a run's save_dir; imports go convert -> training only.
from megatron_tinyllama.checkpoint.training import resolve_model_dir
from megatron_tinyllama.config import ConfigError
from megatron_tinyllama.model.build import padded_vocab_size

logger = logging.getLogger(__name__)

_HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_hf_tokenizer(spm_model: Union[str, Path], out_dir: Path, model_max_length: int) -> None:
    """Tokenizer files for ``AutoTokenizer`` from a sentencepiece (BPE, Llama-style) model.

    The fast tokenizer is built from the model's vocabulary and merges; a probe sentence checks
    that it encodes exactly as sentencepiece does, and a mismatch is logged.
    """
    import inspect

    import sentencepiece as spm
    import transformers

    spm_model = Path(spm_model)
    if not spm_model.is_file():
        raise ConversionError(f"{spm_model}: tokenizer model not found")
    processor = spm.SentencePieceProcessor(model_file=str(spm_model))
    special = dict(
        bos_token=processor.id_to_piece(processor.bos_id()) if processor.bos_id() >= 0 else "<s>",
        eos_token=processor.id_to_piece(processor.eos_id()) if processor.eos_id() >= 0 else "</s>",
        unk_token=processor.id_to_piece(processor.unk_id()),
    )
    if "vocab" in inspect.signature(transformers.LlamaTokenizer.__init__).parameters:
        # transformers >= 5: the Llama tokenizer is a tokenizers BPE built from vocab + merges.
        from tokenizers.models import BPE
        from transformers.convert_slow_tokenizer import SentencePieceExtractor

        extracted = SentencePieceExtractor(str(spm_model)).extract(BPE)
        tokenizer = transformers.LlamaTokenizer(
            vocab=extracted["vocab"], merges=extracted["merges"], add_bos_token=True,
            add_eos_token=False, model_max_length=model_max_length, **special,
        )
    else:  # transformers 4.x converts the sentencepiece file itself
        tokenizer = transformers.LlamaTokenizerFast(
            vocab_file=str(spm_model), add_bos_token=True, add_eos_token=False,
            model_max_length=model_max_length, legacy=False, **special,
        )
    tokenizer.save_pretrained(str(out_dir))
    shutil.copyfile(spm_model, out_dir / "tokenizer.model")
    probe = "The quick brown fox, (x) = 3."
    expected = processor.encode(probe)
    got = tokenizer(probe, add_special_tokens=False).input_ids
    if got != expected:
        logger.warning("HF tokenizer differs from sentencepiece on %r: %s vs %s", probe, got, expected)


def convert_to_hf(source: Union[str, Path], out_dir: Union[str, Path], *,
                  tokenizer_model: Optional[Union[str, Path]] = None, dtype: str = "float32",
                  overwrite: bool = False) -> Path:
    """Convert our checkpoint (any TP degree) into an HF ``LlamaForCausalLM`` directory.

    Raises:
        ConversionError: missing or mismatched tensors, or an architecture HF Llama cannot hold.
    """
    if dtype not in _HF_DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {sorted(_HF_DTYPES)}")
    model_dir = resolve_model_dir(source)
    check_hf_compatible(read_model_index(model_dir)[0])  # before reading gigabytes of weights
    model_cfg, shards = load_model_checkpoint(model_dir)
    full = merge_tp_shards(shards)
    hf_state = {k: v.to(_HF_DTYPES[dtype]).contiguous() for k, v in mcore_to_hf(full, model_cfg).items()}
    bos, eos = 1, 2
    if tokenizer_model is not None:
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
        bos, eos = processor.bos_id(), processor.eos_id()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        config = hf_config_dict(model_cfg, torch_dtype=dtype, bos_token_id=bos, eos_token_id=eos)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        generation = {"bos_token_id": bos, "eos_token_id": eos}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_model is not None:
            write_hf_tokenizer(tokenizer_model, tmp, model_cfg.seq_length)
    logger.info("wrote HF checkpoint %s (%d tensors, from TP=%d)", out_dir, len(hf_state), len(shards))
    return Path(out_dir)


def load_hf_state(source: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single or sharded safetensors, or .bin)."""
    index = source / "model.safetensors.index.json"
    if (source / "model.safetensors").is_file():
        return load_file(str(source / "model.safetensors"))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(str(source / name)))
        return state
    if (source / "pytorch_model.bin").is_file():
        return torch.load(source / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ConversionError(f"{source}: no model.safetensors, safetensors index or pytorch_model.bin")


def convert_from_hf(source: Union[str, Path], out_dir: Union[str, Path], *,
                    tensor_parallel_size: int = 1, overwrite: bool = False) -> Path:
    """Convert an HF Llama directory into our model directory with ``tensor_parallel_size`` shards.

    Raises:
        ConversionError: not a Llama checkpoint, or tensors missing/mismatched.
        ConfigError: the TP degree does not divide the heads or KV groups.
    """
    if tensor_parallel_size < 1:
        raise ConfigError(f"tensor parallel size must be >= 1, got {tensor_parallel_size}")
    source = Path(source)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{source}: no config.json")
    try:
        hf_cfg = json.loads(config_path.read_text())
    except ValueError as err:
        raise ConversionError(f"{config_path}: not valid JSON ({err})") from None
    model_cfg = model_config_from_hf(hf_cfg, source=str(config_path))
    for name in ("num_attention_heads", "num_query_groups"):
        if getattr(model_cfg, name) % tensor_parallel_size:
            raise ConfigError(
                f"tensor parallel size {tensor_parallel_size} does not divide {name}="
                f"{getattr(model_cfg, name)} of {config_path}"
            )
    full = hf_to_mcore(load_hf_state(source), model_cfg,
                       padded_vocab_size(model_cfg.vocab_size, tensor_parallel_size))
    out = save_model_checkpoint(out_dir, model_cfg, shard_for_tp(full, tensor_parallel_size),
                                overwrite=overwrite)
    if (source / "tokenizer.model").is_file():
        shutil.copyfile(source / "tokenizer.model", out / "tokenizer.model")
    logger.info("wrote model checkpoint %s at TP=%d", out_dir, tensor_parallel_size)
    return out


def _run(fn, args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        fn(args)
    except (ConversionError, ConfigError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main_to_hf(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a megatron-tinyllama checkpoint to HF Llama.")
    parser.add_argument("--input", required=True, help="model dir, checkpoint tag dir, or run save_dir")
    parser.add_argument("--output", required=True, help="HF directory to create")
    parser.add_argument("--tokenizer-model", help="sentencepiece .model to export alongside")
    parser.add_argument("--dtype", default="float32", choices=sorted(_HF_DTYPES))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    return _run(lambda a: convert_to_hf(a.input, a.output, tokenizer_model=a.tokenizer_model,
                                        dtype=a.dtype, overwrite=a.overwrite), args)


def main_from_hf(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Convert an HF Llama checkpoint to megatron-tinyllama.")
    parser.add_argument("--input", required=True, help="HF Llama directory")
    parser.add_argument("--output", required=True, help="model directory to create")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    return _run(lambda a: convert_from_hf(a.input, a.output, tensor_parallel_size=a.tensor_parallel_size,
                                          overwrite=a.overwrite), args)
