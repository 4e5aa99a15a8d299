"""``tinyllama-generate``: sample text from a trained model with ``transformers``.

This module owns sampling. The source may be a training run's ``save_dir`` (its ``latest``
checkpoint), a checkpoint tag directory, our model directory, or a Hugging Face Llama directory
(e.g. what ``tinyllama-convert-to-hf`` wrote). Our checkpoints are converted in memory with the
converter's own functions (:mod:`megatron_tinyllama.checkpoint.hf`: one key map, TP shards merged),
so what is sampled is exactly what an export would hold; ``transformers``' ``generate`` does the
decoding. The tokenizer comes from ``--tokenizer-model``, else from the HF directory, else from
``data.tokenizer_model`` in the run's ``config.yaml``.

    tinyllama-generate runs/demo/run --prompt "def parse_args(" --max-new-tokens 80
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from megatron_tinyllama.checkpoint.hf import ConversionError

_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_HF_TOKENIZER = ("tokenizer.json", "tokenizer.model")
DEFAULT_PROMPTS = ('The "for" statement is used to', "def read_lines(path):")
"""One prose and one code prompt (the demo's two streams)."""


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How tokens are drawn (transformers' ``generate`` arguments)."""

    max_new_tokens: int = 80
    greedy: bool = False
    """Take the most likely token every step (temperature, top-k, top-p ignored)."""
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    """Divides the logit of tokens already in the text (1.0: off); keeps small models out of
    loops."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (or use greedy), got {self.temperature}")


def is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / name).is_file() for name in _HF_WEIGHTS)


def _run_config_tokenizer(model_dir: Path) -> Optional[Path]:
    """``data.tokenizer_model`` of the run that wrote ``model_dir`` (``<save_dir>/<tag>/model``),
    from the ``config.yaml`` the trainer saves in ``save_dir``."""
    import yaml

    for folder in (model_dir, *model_dir.parents[:2]):
        config = folder / "config.yaml"
        if config.is_file():
            recipe = yaml.safe_load(config.read_text()) or {}
            name = (recipe.get("data") or {}).get("tokenizer_model")
            return Path(name) if name else None
    return None


def load_hf_model(source: Union[str, Path], dtype: torch.dtype = torch.float32):
    """A ``transformers`` Llama model from an HF directory or from our checkpoint (converted in
    memory), in eval mode.

    Raises:
        ConversionError: not a checkpoint, or one HF Llama cannot hold.
    """
    import transformers

    from megatron_tinyllama.checkpoint.convert import resolve_model_dir
    from megatron_tinyllama.checkpoint.hf import (
        check_hf_compatible,
        hf_config_dict,
        mcore_to_hf,
        merge_tp_shards,
    )
    from megatron_tinyllama.checkpoint.per_rank import load_model_checkpoint, read_model_index

    source = Path(source)
    if is_hf_directory(source):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
        return model.eval()
    model_dir = resolve_model_dir(source)
    check_hf_compatible(read_model_index(model_dir)[0])
    model_cfg, shards = load_model_checkpoint(model_dir)
    state = mcore_to_hf(merge_tp_shards(shards), model_cfg)
    config = transformers.LlamaConfig(**hf_config_dict(model_cfg))
    model = transformers.LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # transformers may keep non-persistent buffers (rotary inv_freq) out of the state dict.
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise ConversionError(f"{model_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype).eval()


def load_tokenizer_for(source: Union[str, Path],
                       tokenizer_model: Optional[Union[str, Path]] = None):
    """The ``transformers`` tokenizer that goes with ``source`` (see the module docstring).

    Raises:
        ConversionError: no tokenizer found, naming where it looked.
    """
    import transformers

    from megatron_tinyllama.checkpoint.convert import resolve_model_dir, write_hf_tokenizer

    source = Path(source)
    if tokenizer_model is None and is_hf_directory(source):
        if any((source / name).is_file() for name in _HF_TOKENIZER):
            return transformers.AutoTokenizer.from_pretrained(str(source))
    if tokenizer_model is None and not is_hf_directory(source):
        tokenizer_model = _run_config_tokenizer(resolve_model_dir(source))
    if tokenizer_model is None:
        raise ConversionError(
            f"{source}: no tokenizer found (no tokenizer files, no data.tokenizer_model in the "
            "run's config.yaml); pass --tokenizer-model")
    tokenizer_model = Path(tokenizer_model)
    if not tokenizer_model.is_file():
        raise ConversionError(f"{tokenizer_model}: tokenizer model not found")
    if tokenizer_model.suffix == ".json":
        return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_model))
    # The same tokenizer files an export would carry, in a scratch directory.
    with tempfile.TemporaryDirectory() as scratch:
        write_hf_tokenizer(tokenizer_model, Path(scratch), model_max_length=1 << 30)
        return transformers.AutoTokenizer.from_pretrained(scratch)


def fit_prompt_to_context(ids: list[int], context: int, max_new_tokens: int,
                          bos_id: Optional[int]) -> list[int]:
    """``ids`` cut so that the prompt plus ``max_new_tokens`` fit in the model's ``context``
    (``seq_length``, HF ``max_position_embeddings``): the model never saw positions beyond it in
    training, so text generated there is noise. The last tokens are kept (the text closest to the
    continuation) and BOS, when the prompt starts with it, stays first, as in training.

    Raises:
        ValueError: ``max_new_tokens`` alone leaves no room for a prompt.
    """
    room = context - max_new_tokens
    if room < 1 + (bos_id is not None and ids[:1] == [bos_id]):
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {context} tokens (seq_length); use at most {context - 2}")
    if len(ids) <= room:
        return ids
    if bos_id is not None and ids[:1] == [bos_id]:
        return [bos_id] + ids[len(ids) - room + 1:]
    return ids[len(ids) - room:]


def generate_ids(model, tokenizer, prompt: str, sampling: SamplingConfig) -> list[int]:
    """Token ids of ``prompt`` (with BOS, as the tokenizer adds it) and its continuation.

    A prompt that leaves no room for ``max_new_tokens`` in the model's context keeps its last
    tokens (:func:`fit_prompt_to_context`) and a warning line on stderr says how many were dropped.
    """
    inputs = tokenizer(prompt, return_tensors="pt")
    inputs.pop("token_type_ids", None)
    ids = inputs["input_ids"][0].tolist()
    context = int(model.config.max_position_embeddings)
    kept = fit_prompt_to_context(ids, context, sampling.max_new_tokens, tokenizer.bos_token_id)
    if len(kept) < len(ids):
        print(f"tinyllama-generate: warning: the prompt has {len(ids)} tokens; the model's "
              f"context is {context} (seq_length) with {sampling.max_new_tokens} new tokens, so "
              f"only its last {len(kept)} tokens are used ({len(ids) - len(kept)} dropped)",
              file=sys.stderr)
        inputs = {"input_ids": torch.tensor([kept]),
                  "attention_mask": torch.ones(1, len(kept), dtype=torch.long)}
    torch.manual_seed(sampling.seed)
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                  repetition_penalty=sampling.repetition_penalty)
    if sampling.greedy:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k,
                      top_p=sampling.top_p)
    with torch.no_grad():
        return model.generate(**inputs, **kwargs)[0].tolist()


def generate(model, tokenizer, prompts: Sequence[str], sampling: SamplingConfig) -> list[str]:
    """One continuation per prompt (the prompt included), decoded without special tokens."""
    return [tokenizer.decode(generate_ids(model, tokenizer, prompt, sampling),
                             skip_special_tokens=True) for prompt in prompts]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyllama-generate",
        description="Sample from a run's save_dir (latest checkpoint), a checkpoint tag or model "
                    "directory, or an HF Llama directory.")
    parser.add_argument("source", type=Path)
    parser.add_argument("--prompt", action="append", default=None,
                        help="repeatable; default: one prose and one code prompt")
    parser.add_argument("--tokenizer-model", type=Path,
                        help="sentencepiece .model or tokenizer.json (default: the HF directory's "
                             "tokenizer, else data.tokenizer_model of the run's config.yaml)")
    parser.add_argument("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens)
    parser.add_argument("--greedy", action="store_true", help="most likely token each step")
    parser.add_argument("--temperature", type=float, default=SamplingConfig.temperature)
    parser.add_argument("--top-k", type=int, default=SamplingConfig.top_k)
    parser.add_argument("--top-p", type=float, default=SamplingConfig.top_p)
    parser.add_argument("--repetition-penalty", type=float,
                        default=SamplingConfig.repetition_penalty)
    parser.add_argument("--seed", type=int, default=SamplingConfig.seed)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns 0, or 2 on bad input (printed as one line)."""
    from megatron_tinyllama.console import hide_known_noise

    args = build_parser().parse_args(argv)
    hide_known_noise()
    try:
        sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
            seed=args.seed)
        tokenizer = load_tokenizer_for(args.source, args.tokenizer_model)
        model = load_hf_model(args.source)
        for prompt in args.prompt or DEFAULT_PROMPTS:
            text = generate(model, tokenizer, [prompt], sampling)[0]
            print(f"{text}\n{'-' * 40}")
    except (ConversionError, ValueError, OSError) as err:
        print(f"tinyllama-generate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
