"""The stack against an independent trainer, where real runs go: converted weights, TP x DP, bf16.

A random transformers Llama (non-trivial norm gains, a vocabulary that needs TP padding, GQA) is
converted by the converter's CLI at TP 1, 2 and 4 and trained with ``checkpoint.init_from`` for 5
steps by this stack (DeepSpeed ZeRO-3 over gloo ranks) and by ``tests/reference_trainer.py``
(transformers + torch AdamW) on identical global batches: weight decay, clipping that clips (every
step's norm is above the threshold), 2-8 micro-batches accumulated per step, warm-up + cosine LR.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.distributed.ranks import run_on_ranks
from tests.distributed.synthetic import synthetic_batches, synthetic_sample
from tests.hf_helpers import save_hf_model, tricky_config
from tests.reference_trainer import ReferenceSettings, train_reference

pytestmark = pytest.mark.distributed

MODEL = tricky_config(num_query_groups=4)  # 8 heads in 4 KV groups: TP 1, 2 and 4 all divide it
SEQ = MODEL.seq_length
GLOBAL_BATCH = 16  # sequences per step
MICRO_BATCH = 2    # accumulation: 8 steps at DP=1, 4 at DP=2, 2 at DP=4
STEPS = 5
STEP_TOKENS = GLOBAL_BATCH * SEQ
# Adam turns fp32 rounding noise in near-zero gradients into updates of up to ~lr, so the weight
# tolerance (the reference's own fp32 error, see assert_weights_match_reference) grows with the
# LR: a modest one keeps it far below what a fault moves the weights by.
SETTINGS = ReferenceSettings(lr=1e-3, min_lr=1e-4, warmup_tokens=STEP_TOKENS, decay_tokens=STEPS * STEP_TOKENS,
                             weight_decay=0.1, grad_clip=0.3)


# Scaled to the test models as DeepSpeed's default (100,000 elements) is to a 1.1B run: the norm
# gains (hidden = 64 elements) stay whole on every rank, the matrices (4,096 and more) are partitioned.
PERSISTENCE_THRESHOLD = 1000


def _partitioned_ds_config(directory: Path) -> Path:
    """ds_configs/zero3.json with the persistence threshold scaled to the test models. At the
    default every tensor of a test model is under it, so ZeRO-3 kept each whole on every rank and
    never partitioned one, where a 1.1B run partitions every matrix (norm gains of 2,048 stay
    whole): a resharding load then reads only its partition of the matrices and the norm gains
    whole, and both have to be right."""
    from megatron_tinyllama.engine.ds_config import REPO_DS_CONFIGS

    path = directory / "zero3_partitioned.json"
    if not path.is_file():
        config = json.loads((REPO_DS_CONFIGS / "zero3.json").read_text())
        config["zero_optimization"]["stage3_param_persistence_threshold"] = PERSISTENCE_THRESHOLD
        path.write_text(json.dumps(config))
    return path


def recipe(save_dir: Path, *, tp: int = 1, precision: str = "fp32", steps: int = STEPS,
           init_from=None, continue_from=None, save_interval: int = 100, hpz: int = 1,
           lr: float = SETTINGS.lr) -> dict:
    model = {k: v for k, v in dataclasses.asdict(MODEL).items() if k != "preset"}
    checkpoint = {"save_dir": str(save_dir), "save_interval_steps": save_interval, "keep_last": 0}
    if init_from:
        checkpoint["init_from"] = str(init_from)
    if continue_from:
        checkpoint["continue_from"] = str(continue_from)
    return {
        "model": model,
        "parallel": {"tensor_parallel_size": tp, "hpz_partition_size": hpz, "seed": 7,
                     "ds_config": str(_partitioned_ds_config(Path(save_dir).parent))},
        "optimizer": {"lr": lr, "min_lr": min(lr, SETTINGS.min_lr), "warmup_tokens": SETTINGS.warmup_tokens,
                      "decay_tokens": SETTINGS.decay_tokens, "weight_decay": SETTINGS.weight_decay,
                      "grad_clip": SETTINGS.grad_clip, "beta1": SETTINGS.beta1, "beta2": SETTINGS.beta2,
                      "eps": SETTINGS.eps},
        "train": {"train_tokens": steps * STEP_TOKENS, "global_batch_tokens": STEP_TOKENS,
                  "micro_batch_size": MICRO_BATCH, "precision": precision},
        "checkpoint": checkpoint,
        "logging": {"log_interval_steps": 1},
    }


def reference_batches(steps: int = STEPS) -> list[list[torch.Tensor]]:
    """The global batches the stack's synthetic loader yields, split into micro-batches."""
    return [[torch.stack([synthetic_sample(s * GLOBAL_BATCH + m + j, SEQ) for j in range(MICRO_BATCH)])
             for m in range(0, GLOBAL_BATCH, MICRO_BATCH)] for s in range(steps)]


def step_records(save_dir: Path) -> dict[int, dict]:
    """Step -> its last metrics record (a resumed run appends)."""
    records = [json.loads(line) for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "train_loss" in r}


def _train_worker(rank, world_size, tree, out):
    import deepspeed.utils.groups as ds_groups
    import torch.distributed as dist

    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.train.loop import train

    train(config_from_dict(tree), batch_source=synthetic_batches)
    group = ds_groups._ZERO_PARAM_INTRA_PARALLEL_GROUP
    info = {"node_local_group": dist.get_process_group_ranks(group) if group is not None else None}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(info))


def run_stack(tmp: Path, name: str, world_size: int, ranks_per_node: int = 0, **kwargs) -> Path:
    save_dir = tmp / name
    tree = recipe(save_dir, **kwargs)
    # ZeRO-3 over the data-parallel ranks, ZeRO-1 at one ('auto' depends on the device; name it).
    tree["parallel"]["zero_stage"] = 3 if world_size // kwargs.get("tp", 1) > 1 else 1
    run_on_ranks(_train_worker, world_size, tree, str(tmp), ranks_per_node=ranks_per_node)
    return save_dir


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An HF Llama and its conversions by the CLI at TP 1, 2 and 4, plus the reference runs."""
    from megatron_tinyllama.checkpoint.convert import main_from_hf

    tmp = tmp_path_factory.mktemp("reference")
    hf_dir = save_hf_model(MODEL, tmp / "hf", seed=3)
    converted = {}
    for tp in (1, 2, 4):
        converted[tp] = tmp / f"ours_tp{tp}"
        assert main_from_hf(["--input", str(hf_dir), "--output", str(converted[tp]),
                             "--tensor-parallel-size", str(tp)]) == 0
    fp32 = train_reference(hf_dir, reference_batches(), SETTINGS)
    assert all(norm > SETTINGS.grad_clip for norm in fp32.grad_norms), fp32.grad_norms  # clipping clips
    return {"tmp": tmp, "hf": hf_dir, "converted": converted, "fp32": fp32}


def assert_matches_reference(save_dir: Path, reference, tolerance: float = 1e-5) -> None:
    records = step_records(save_dir)
    assert sorted(records) == list(range(1, STEPS + 1))
    for step, (loss, norm) in enumerate(zip(reference.losses, reference.grad_norms), start=1):
        assert abs(records[step]["train_loss"] - loss) <= tolerance, (step, records[step], loss)
        assert abs(records[step]["grad_norm"] - norm) <= tolerance * max(1.0, norm), (step, records[step], norm)


def assert_weights_match_reference(save_dir: Path, reference, tmp: Path) -> None:
    """The run's final checkpoint, converted by the CLI to HF, equals the reference's weights to
    the reference's own fp32 rounding (``reference.weight_tolerance``, derived in
    ``tests/reference_trainer.py``: 4x its distance from the same training in float64)."""
    tolerance = reference.weight_tolerance
    assert 0 < tolerance < 1e-4, tolerance  # far below ~lr, what lost moments move weights by
    from safetensors.torch import load_file

    from megatron_tinyllama.checkpoint.convert import main_to_hf

    out = tmp / f"{Path(save_dir).name}_as_hf"
    assert main_to_hf(["--input", str(save_dir), "--output", str(out)]) == 0
    ours = load_file(str(out / "model.safetensors"))
    assert set(ours) == set(reference.state)
    for name, tensor in reference.state.items():
        assert (ours[name] - tensor).abs().max().item() <= tolerance, (name, tolerance)


@pytest.fixture(scope="module")
def dp2_run(source):
    return run_stack(source["tmp"], "dp2", 2, init_from=source["converted"][1])


def test_dp2_from_converted_weights_matches_reference(source, dp2_run):
    assert_matches_reference(dp2_run, source["fp32"])
    assert_weights_match_reference(dp2_run, source["fp32"], source["tmp"])


def test_init_from_a_previous_run_at_another_tp_degree_keeps_its_weights(source, dp2_run):
    """The issue's reproduction: at LR 0 every step's loss is the loss of the loaded weights (the
    first optimizer step used to put back the random initialisation)."""
    import transformers

    tmp = source["tmp"]
    save_dir = run_stack(tmp, "from_run", 2, tp=2, steps=3, init_from=dp2_run, lr=0.0)
    hf_dir = tmp / "dp2_final_as_hf"
    from megatron_tinyllama.checkpoint.convert import convert_to_hf

    convert_to_hf(dp2_run, hf_dir)
    model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    records = step_records(save_dir)
    with torch.no_grad():
        for step, micro_batches in enumerate(reference_batches(3), start=1):
            rows = torch.cat(micro_batches)
            logits = model(input_ids=rows[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     rows[:, 1:].reshape(-1)).item()
            assert abs(records[step]["train_loss"] - loss) <= 1e-5, (step, records[step], loss)


def test_tp2_from_a_tp4_checkpoint_matches_reference(source):
    save_dir = run_stack(source["tmp"], "tp2", 2, tp=2, init_from=source["converted"][4])
    assert_matches_reference(save_dir, source["fp32"])
    assert_weights_match_reference(save_dir, source["fp32"], source["tmp"])


def test_tp2_dp2_matches_reference_and_resumes_exactly(source):
    save_dir = run_stack(source["tmp"], "tp2dp2", 4, tp=2, init_from=source["converted"][2], save_interval=3)
    assert_matches_reference(save_dir, source["fp32"])
    assert_weights_match_reference(save_dir, source["fp32"], source["tmp"])
    first = step_records(save_dir)
    (save_dir / "latest").write_text("global_step000003")  # resume from the middle
    run_stack(source["tmp"], "tp2dp2", 4, tp=2, init_from=source["converted"][2], save_interval=3)
    resumed = step_records(save_dir)
    for step in (4, 5):
        assert resumed[step]["train_loss"] == first[step]["train_loss"]
        assert resumed[step]["grad_norm"] == first[step]["grad_norm"]
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    # Steps 4 and 5 of the first run are superseded (metrics.superseded.jsonl); the resumed run
    # logged exactly steps 4 and 5 after recording the resume.
    assert [r.get("event", r["step"]) for r in records] == [1, 2, 3, "resume", 4, 5]


def test_a_stage_continues_a_run_with_its_optimizer_state(source):
    """Stage 2 on stage 1's data (continue_from) gives the losses of stage 1 continued."""
    tmp = source["tmp"]
    stage1 = run_stack(tmp, "stage1", 2, steps=3, init_from=source["converted"][1])
    stage2 = run_stack(tmp, "stage2", 2, continue_from=stage1)
    one, two = step_records(stage1), step_records(stage2)
    assert sorted(one) == [1, 2, 3] and sorted(two) == [4, 5]
    reference = source["fp32"]
    for step in range(1, STEPS + 1):
        loss = (one if step <= 3 else two)[step]["train_loss"]
        assert abs(loss - reference.losses[step - 1]) <= 1e-5, step
    state = json.loads((stage2 / "global_step000005" / "trainer_state.json").read_text())
    assert state["consumed_tokens"] == STEPS * STEP_TOKENS and state["stage_start_samples"] == 3 * GLOBAL_BATCH


def test_node_local_sharding_with_tp2_on_two_nodes_matches_reference(source):
    """8 ranks = 2 simulated nodes x 4, TP=2: node-local groups per (node, TP rank), DP=4."""
    tmp = source["tmp"]
    save_dir = run_stack(tmp, "hpz_tp2", 8, ranks_per_node=4, tp=2, hpz=0, init_from=source["converted"][2])
    groups = [json.loads((tmp / f"rank{r}.json").read_text())["node_local_group"] for r in range(8)]
    assert groups == [[0, 2], [1, 3], [0, 2], [1, 3], [4, 6], [5, 7], [4, 6], [5, 7]]
    assert_matches_reference(save_dir, source["fp32"])


def _bf16_worker(rank, world_size, tree, out):
    """Train in bf16, then check the engine's precision recipe and its rotary table at 2047."""
    import transformers
    from megatron.core import parallel_state

    from megatron_tinyllama.checkpoint.hf import hf_config_dict
    from megatron_tinyllama.config import config_from_dict
    from megatron_tinyllama.engine.engine import build_engine
    from megatron_tinyllama.parallel.init import read_launcher_env
    from megatron_tinyllama.train.loop import train

    cfg = config_from_dict(tree)
    train(cfg, batch_source=synthetic_batches)
    long = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, seq_length=2048),
                               train=dataclasses.replace(cfg.train, global_batch_tokens=4 * 2048))
    te = build_engine(long, read_launcher_env())
    zero = te.engine.optimizer
    emb = te.model.rotary_pos_emb(2048)  # [2048, 1, 1, head_dim], fp32 angles
    hf_rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(
        transformers.LlamaConfig(**hf_config_dict(long.model)))
    positions = torch.arange(2048).unsqueeze(0)
    hf_cos, _ = hf_rotary(torch.zeros(1, dtype=torch.float32), positions)
    info = {
        "param_dtype": str(next(te.model.parameters()).dtype),
        "grad_accum_dtype": str(zero.gradient_accumulation_dtype),
        "communication_dtype": str(zero.communication_data_type),
        "master_dtype": str(zero.fp32_partitioned_groups_flat[0].dtype),
        "inv_freq_dtype": str(te.model.rotary_pos_emb.inv_freq.dtype),
        "cos_2047_max_error": (torch.cos(emb[2047, 0, 0].float()) - hf_cos[0, 2047]).abs().max().item(),
        "bf16_positions_cos_error": (torch.cos(torch.outer(
            torch.arange(2048, dtype=torch.bfloat16).float(), te.model.rotary_pos_emb.inv_freq))[2047]
            - hf_cos[0, 2047, : MODEL.head_dim // 2]).abs().max().item(),
    }
    if parallel_state.get_data_parallel_rank() == 0:
        (Path(out) / "bf16.json").write_text(json.dumps(info))


def test_bf16_dp2_matches_the_reference_within_bf16_rounding(source):
    """bf16 with fp32 master weights, fp32 accumulation and reduction, fp32 rotary positions.

    Tolerance, derived: bf16 keeps 8 bits of mantissa (unit roundoff u = 2^-8), so a bf16 forward
    and backward is off from the exact (fp32) computation by an amount set by this model and
    these batches, not by the implementation. We measure it as delta = max over steps of
    |reference in bf16 - reference in fp32|. Any two bf16 implementations of the same recipe are
    each about delta from the exact losses, hence within about 2 delta of each other (triangle
    inequality); we allow 3 delta (measured here: delta ~1e-4, the stack ~0.7 delta from the bf16
    reference and ~0.4 delta from the fp32 one). Weights lost at the first step move the losses
    by ~0.1, far beyond it. Two mistakes this short, 4-micro-batch run cannot show in its losses
    are checked directly: the rotary table at position 2047 (bf16 positions are exact only up to
    256) and the dtypes of master weights, gradient accumulation and reduction.
    """
    tmp = source["tmp"]
    bf16_ref = train_reference(source["hf"], reference_batches(), dataclasses.replace(SETTINGS, precision="bf16"))
    fp32_ref = source["fp32"]
    delta = max(abs(a - b) for a, b in zip(bf16_ref.losses, fp32_ref.losses))
    assert 0 < delta < 0.05, delta  # bf16 changes the losses, by a little
    save_dir = tmp / "bf16"
    tree = recipe(save_dir, precision="bf16", init_from=source["converted"][1])
    tree["parallel"]["zero_stage"] = 3
    run_on_ranks(_bf16_worker, 2, tree, str(tmp))
    records = step_records(save_dir)
    ours = [records[s]["train_loss"] for s in range(1, STEPS + 1)]
    gap = max(abs(a - b) for a, b in zip(ours, bf16_ref.losses))
    assert gap <= 3 * delta, (gap, delta, ours, bf16_ref.losses)
    assert ours != fp32_ref.losses  # it really trained in bf16
    info = json.loads((tmp / "bf16.json").read_text())
    assert info["param_dtype"] == "torch.bfloat16" and info["master_dtype"] == "torch.float32"
    assert info["grad_accum_dtype"] == "torch.float32" and info["communication_dtype"] == "torch.float32"
    assert info["inv_freq_dtype"] == "torch.float32"
    assert info["cos_2047_max_error"] <= 1e-6
    assert info["bf16_positions_cos_error"] > 0.1  # what the table would be with bf16 positions
