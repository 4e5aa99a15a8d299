"""``tinyllama-pipeline`` in miniature: three stages through the deepspeed launcher on CPU ranks,
each continuing the previous one, ending in a Hugging Face model; run again, it does nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from megatron_tinyllama.pipeline import main

pytestmark = pytest.mark.slow

SEQ = 64
BATCH = 16 * SEQ  # tokens


def _write_stage(recipes: Path, name: str, number: int, corpus, *, blend: str, end_steps: int,
                 batch_tokens: int = BATCH, warmup=None) -> None:
    data = {"blend": blend, "tokenizer_model": str(corpus.tokenizer_model)}
    if warmup:
        data["mixture_warmup"] = warmup
    recipe = {
        "name": name,
        "model": {"preset": "tinyllama-debug", "vocab_size": 1024},
        "data": data,
        # One cosine over the three stages' 12 steps of 1024 tokens: every stage has the same block.
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_tokens": 2 * BATCH, "decay_tokens": 12 * BATCH},
        "train": {"train_tokens": end_steps * BATCH, "global_batch_tokens": batch_tokens,
                  "micro_batch_size": 4, "precision": "fp32"},
        "checkpoint": {"save_dir": f"runs/{name}", "save_interval_steps": 100},
        "logging": {"log_interval_steps": 1},
        "stage": {"number": number, "count": 3, "variant": None if number == 1 else "mini"},
    }
    (recipes / f"{name}.yaml").write_text(yaml.safe_dump(recipe))


def _records(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


def test_three_stage_pipeline_continues_each_stage_and_ends_in_an_hf_model(tmp_path, small_corpus):
    import torch
    import transformers

    from megatron_tinyllama.config import load_config
    from megatron_tinyllama.train.schedule import learning_rate

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    text, code = small_corpus.text_prefix, small_corpus.code_prefix
    _write_stage(recipes, "stage1_basic", 1, small_corpus, blend=f"1.0 {text}", end_steps=6)
    _write_stage(recipes, "stage2_mini", 2, small_corpus, blend=f"0.5 {text} 0.5 {code}", end_steps=10,
                 warmup={"start_weights": [1.0, 0.0], "warmup_tokens": 2 * BATCH})
    _write_stage(recipes, "stage3_mini", 3, small_corpus, blend=f"0.5 {text} 0.5 {code}", end_steps=12,
                 batch_tokens=2 * BATCH)  # the cooldown grows the batch
    run_dir, hf = tmp_path / "runs", tmp_path / "hf"
    args = ["--variant", "mini", "--recipes-dir", str(recipes), "--local-ranks", "2",
            "--run-dir", str(run_dir), "--hf-out", str(hf)]
    assert main(args) == 0

    stage1, stage2, stage3 = (run_dir / n for n in ("stage1_basic", "stage2_mini", "stage3_mini"))
    steps = [[r["step"] for r in _records(d) if "train_loss" in r] for d in (stage1, stage2, stage3)]
    assert steps == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10], [11]]  # stage 3: one step of 2 batches
    # One cosine across the stages: each logged LR is the schedule at that step's token count.
    cfg = load_config(recipes / "stage3_mini.yaml")
    for save_dir in (stage1, stage2, stage3):
        for record in (r for r in _records(save_dir) if "train_loss" in r):
            assert record["lr"] == pytest.approx(learning_rate(record["tokens"], cfg.optimizer, 0))
    # Each checkpoint records its stage, variant and tokens; stage 2 started where stage 1 ended.
    state = json.loads((stage3 / "global_step000011" / "trainer_state.json").read_text())
    assert state["config"]["stage"] == {"number": 3, "count": 3, "variant": "mini"}
    assert state["consumed_tokens"] == 12 * BATCH and state["stage_start_tokens"] == 10 * BATCH
    state2 = json.loads((stage2 / "global_step000010" / "trainer_state.json").read_text())
    assert state2["stage_start_samples"] == 6 * 16 and state2["config"]["checkpoint"]["continue_from"] == str(stage1)
    # The result is an HF Llama that transformers loads and runs.
    model = transformers.LlamaForCausalLM.from_pretrained(str(hf))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf))
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

    # Run again: every stage is finished, nothing is launched, nothing changes.
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert main(args[:-2]) == 0
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before
