"""tinyllama-generate: greedy text from a run's checkpoint equals greedy decoding with our own
megatron-core model, and the HF export gives the same; the tokenizer is found from the run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_tinyllama.checkpoint.convert import convert_to_hf
from megatron_tinyllama.checkpoint.native import write_model_files
from megatron_tinyllama.config import config_from_dict, save_config
from megatron_tinyllama.generate import (
    SamplingConfig,
    generate_ids,
    load_hf_model,
    load_tokenizer_for,
    main,
)
from megatron_tinyllama.model.build import build_model, forward_logits
from megatron_tinyllama.parallel.init import set_seed
from tests.hf_helpers import randomize_norms, tricky_config

PROMPT = "def f(x):\n    return"
NEW_TOKENS = 16


def _greedy_with_our_model(model, ids: list[int], vocab_size: int) -> tuple[list[int], float]:
    """Greedy decoding by megatron-core's forward (full recompute each step, no KV cache); also the
    smallest top-1/top-2 logit gap seen, to show the comparison is not decided by rounding."""
    ids, smallest_gap = list(ids), float("inf")
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = forward_logits(model, torch.tensor([ids]))[0, -1, :vocab_size]
            top2 = torch.topk(logits, 2).values
            smallest_gap = min(smallest_gap, (top2[0] - top2[1]).item())
            ids.append(int(logits.argmax()))
    return ids, smallest_gap


@pytest.fixture
def trained_run(mcore_cpu, tmp_path, llama_spm):
    """A run's save_dir as the trainer leaves it: config.yaml naming the tokenizer, a 'latest'
    file and the model weights of that checkpoint (random weights, decisive logits), marked
    complete by its trainer_state.json."""
    cfg = dataclasses.replace(tricky_config(vocab_size=512), init_method_std=0.3)
    set_seed(5)
    model = build_model(cfg).eval()
    randomize_norms(model)
    save_dir = tmp_path / "run"
    (save_dir / "global_step000003" / "model").mkdir(parents=True)
    write_model_files(save_dir / "global_step000003" / "model", cfg, 0, 1, model.state_dict())
    (save_dir / "latest").write_text("global_step000003")
    job = config_from_dict({"model": dataclasses.asdict(cfg),
                            "data": {"tokenizer_model": str(llama_spm)}})
    save_config(job, save_dir / "config.yaml")
    (save_dir / "global_step000003" / "trainer_state.json").write_text(json.dumps(
        {"step": 3, "consumed_samples": 24, "consumed_tokens": 24 * cfg.seq_length, "config": job.to_dict()}))
    return save_dir, model, cfg


def test_greedy_generation_matches_our_model_from_the_run_and_from_the_export(
        trained_run, tmp_path, llama_spm):
    import sentencepiece as spm

    save_dir, our_model, cfg = trained_run
    prompt_ids = [1] + spm.SentencePieceProcessor(model_file=str(llama_spm)).encode(PROMPT)
    expected, gap = _greedy_with_our_model(our_model, prompt_ids, cfg.vocab_size)
    assert gap > 1e-3

    greedy = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=NEW_TOKENS)
    tokenizer = load_tokenizer_for(save_dir)  # found through the run's config.yaml
    from_run = generate_ids(load_hf_model(save_dir), tokenizer, PROMPT, greedy)
    assert from_run == expected

    hf_dir = convert_to_hf(save_dir, tmp_path / "hf", tokenizer_model=llama_spm)
    from_export = generate_ids(load_hf_model(hf_dir), load_tokenizer_for(hf_dir), PROMPT, greedy)
    assert from_export == expected
    # A checkpoint tag directory and the model directory itself resolve the same way.
    tag = save_dir / "global_step000003"
    assert generate_ids(load_hf_model(tag), load_tokenizer_for(tag), PROMPT, greedy) == expected


def test_cli_samples_reproducibly_and_names_bad_input(trained_run, tmp_path, capsys):
    save_dir, _, _ = trained_run
    argv = [str(save_dir), "--prompt", PROMPT, "--max-new-tokens", "8", "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith(PROMPT) and main(argv) == 0 and capsys.readouterr().out == first

    assert main([str(tmp_path / "nowhere")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    bare = tmp_path / "bare_model"  # a model directory with no run config beside it
    bare.mkdir()
    for path in (save_dir / "global_step000003" / "model").iterdir():
        (bare / path.name).write_bytes(path.read_bytes())
    assert main([str(bare)]) == 2
    assert "pass --tokenizer-model" in capsys.readouterr().err


def test_prompt_longer_than_the_context_keeps_its_last_tokens_and_says_so(
        trained_run, capsys, llama_spm):
    """seq_length is 32 here: a prompt of ~100 tokens plus 4 new ones would run the model at
    positions it never saw. The prompt keeps BOS and its last 28 tokens (a warning says so), and
    the continuation equals greedy decoding of exactly that cut prompt with our own model."""
    import sentencepiece as spm

    save_dir, our_model, cfg = trained_run
    long_prompt = " ".join(f"word{i}" for i in range(40))
    spm_ids = spm.SentencePieceProcessor(model_file=str(llama_spm)).encode(long_prompt)
    assert len(spm_ids) + 1 > cfg.seq_length
    new = 4
    cut = [1] + spm_ids[len(spm_ids) - (cfg.seq_length - new - 1):]
    ids = list(cut)
    with torch.no_grad():
        for _ in range(new):
            ids.append(int(forward_logits(our_model, torch.tensor([ids]))[0, -1, :cfg.vocab_size]
                           .argmax()))

    greedy = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=new)
    got = generate_ids(load_hf_model(save_dir), load_tokenizer_for(save_dir), long_prompt, greedy)
    assert got == ids and len(got) == cfg.seq_length
    err = capsys.readouterr().err
    assert f"only its last {cfg.seq_length - new} tokens are used" in err
    assert f"context is {cfg.seq_length}" in err

    # No room for any prompt: refused with exit 2 naming the flag.
    assert main([str(save_dir), "--prompt", "hi", "--max-new-tokens", str(cfg.seq_length)]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
