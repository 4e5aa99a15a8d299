"""Checkpoint bookkeeping without a model: which checkpoint a run starts from, what it refuses,
what retention deletes, and how damaged files are found. Each fault is reproduced on real files."""

from __future__ import annotations

import json
import shutil
import logging
from pathlib import Path

import pytest

from megatron_tinyllama.checkpoint.training import (
    CheckpointError,
    TrainerState,
    checkpoint_problems,
    plan_start,
    prune_checkpoints,
    resume_candidates,
    step_tag,
)
from megatron_tinyllama.checkpoint.manifest import write_manifest
from megatron_tinyllama.config import ConfigError, config_from_dict


def job(save_dir=None, **sections):
    tree = {"model": {"preset": "tinyllama-debug"}, "train": {"train_tokens": 64 * 8 * 10,
                                                              "global_batch_tokens": 64 * 8,
                                                              "micro_batch_size": 2}}
    if save_dir is not None:
        tree["checkpoint"] = {"save_dir": str(save_dir)}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return config_from_dict(tree)


MINIMAL_STATE = {"step": 2, "consumed_samples": 0, "consumed_tokens": 0, "config": {"model": {}}}


RAN_AS_PLANNED = object()


def fake_checkpoint(save_dir: Path, step: int, cfg=None, *, run_id="run-a", world_size=2,
                    complete=True, layout=RAN_AS_PLANNED, **extra) -> Path:
    """A checkpoint directory with a few payload files and (if complete) its trainer state, which
    records the layout the recipe ran on ``world_size`` ranks of one node, as a save does
    (``layout=None``: a checkpoint from before that record)."""
    from megatron_tinyllama.engine.ds_config import planned_layout

    cfg = cfg or job(save_dir)
    if layout is RAN_AS_PLANNED:
        layout = planned_layout(cfg, world_size, world_size).as_dict()
    if layout is not None:
        extra = {"layout": layout, **extra}
    tag_dir = save_dir / step_tag(step)
    (tag_dir / "model").mkdir(parents=True)
    (tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(bytes(range(256)) * 40)
    (tag_dir / "model" / "model-tp00-of-01.safetensors").write_bytes(b"weights" * 100)
    if complete:
        write_manifest(tag_dir)
        payload = {"step": step, "consumed_samples": step * 8, "consumed_tokens": step * 512,
                   "skipped_steps": 0, "run_id": run_id, "config": cfg.to_dict(),
                   "world_size": world_size, **extra}
        (tag_dir / "trainer_state.json").write_text(json.dumps(payload))
    return tag_dir


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_retention_sorts_by_step_past_a_million(tmp_path):
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        fake_checkpoint(tmp_path, step)
    deleted = prune_checkpoints(tmp_path, keep=2, run_id="run-a", current=step_tag(1_000_001))
    assert sorted(deleted) == ["global_step999998", "global_step999999"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step1000000", "global_step1000001"]


def test_retention_spares_other_runs_and_a_rolled_back_future(tmp_path):
    fake_checkpoint(tmp_path, 2, run_id="someone-else")
    for step in (4, 6, 8, 20):
        fake_checkpoint(tmp_path, step)
    kept = tree_bytes(tmp_path / "global_step000002") | tree_bytes(tmp_path / "global_step000020")
    # Rolled back to 6, now saving 8: only this run's checkpoints up to 8 compete for keep_last.
    assert prune_checkpoints(tmp_path, keep=2, run_id="run-a", current=step_tag(8)) == ["global_step000004"]
    assert tree_bytes(tmp_path / "global_step000002") | tree_bytes(tmp_path / "global_step000020") == kept


def test_latest_naming_a_missing_directory_falls_back_to_the_newest_complete(tmp_path, caplog):
    for step in (2, 4):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 6, complete=False)  # an interrupted save
    (tmp_path / "latest").write_text("global_step000008")  # its directory is gone
    with caplog.at_level(logging.WARNING):
        plan = plan_start(job(tmp_path), world_size=2)
    assert plan.kind == "resume"
    assert [p.name for p in plan.candidates] == ["global_step000004", "global_step000002"]
    assert "names global_step000008, which is missing" in caplog.text


def test_latest_rolled_back_by_the_user_is_respected(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "latest").write_text("global_step000004")
    assert [p.name for p in resume_candidates(tmp_path)] == ["global_step000004", "global_step000002"]


def test_latest_without_any_complete_checkpoint_stops_instead_of_starting_over(tmp_path):
    fake_checkpoint(tmp_path, 2, complete=False)
    (tmp_path / "latest").write_text("global_step000002")
    before = tree_bytes(tmp_path)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        plan_start(job(tmp_path), world_size=2)
    assert tree_bytes(tmp_path) == before


def test_resume_refuses_another_head_layout_whose_tensors_have_the_same_shapes(tmp_path):
    # 8 heads in 2 groups of dim 8, or 16 heads in 4 groups of dim 4: QKV is 96 x 64 either way.
    fake_checkpoint(tmp_path, 2)
    other = job(tmp_path, model={"num_attention_heads": 16, "num_query_groups": 4})
    with pytest.raises(ConfigError) as err:
        plan_start(other, world_size=2)
    message = str(err.value)
    assert "model.num_attention_heads: checkpoint 8, recipe 16" in message
    assert "model.num_query_groups: checkpoint 2, recipe 4" in message


def test_resume_refuses_another_parallel_layout_or_tokenizer(tmp_path):
    fake_checkpoint(tmp_path, 2, world_size=4, tokenizer_fingerprint="0123456789abcdef",
                    cfg=job(tmp_path, data={"tokenizer_model": "old/tokenizer.model"}))
    tokenizer = tmp_path / "new.model"
    tokenizer.write_bytes(b"another tokenizer")
    cfg = job(tmp_path, parallel={"tensor_parallel_size": 2}, data={"tokenizer_model": str(tokenizer)})
    with pytest.raises(ConfigError) as err:
        plan_start(cfg, world_size=2)
    message = str(err.value)
    assert "DP 4 -> 1" in message and "TP 1 -> 2" in message and "no layout-free optimizer state" in message
    assert "a different tokenizer" in message


def test_init_from_another_model_is_refused_before_anything_is_built(tmp_path):
    from megatron_tinyllama.checkpoint.native import save_model_checkpoint
    from megatron_tinyllama.model.presets import get_preset

    save_model_checkpoint(tmp_path / "ckpt", get_preset("tinyllama-debug", hidden_size=128), [{}])
    with pytest.raises(ConfigError, match=r"model.hidden_size: checkpoint 128, recipe 64"):
        plan_start(job(None, checkpoint={"init_from": str(tmp_path / "ckpt")}), world_size=1)


def test_continue_from_needs_tokens_beyond_the_checkpoint(tmp_path):
    fake_checkpoint(tmp_path / "stage1", 10)
    cfg = job(tmp_path / "stage2", checkpoint={"continue_from": str(tmp_path / "stage1")},
              train={"train_tokens": 10 * 512})
    with pytest.raises(ConfigError, match="not beyond the 5,120 tokens"):
        plan_start(cfg, world_size=2)


def test_manifest_names_truncated_and_corrupt_files(tmp_path):
    tag_dir = fake_checkpoint(tmp_path, 2)
    assert checkpoint_problems(tag_dir) == []
    optim = tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:100])
    shard = tag_dir / "model" / "model-tp00-of-01.safetensors"
    shard.write_bytes(shard.read_bytes().replace(b"weights", b"wEights", 1))
    problems = checkpoint_problems(tag_dir)
    assert any(str(optim) in p and "truncated" in p for p in problems), problems
    assert any(str(shard) in p and "corrupt" in p for p in problems), problems
    assert checkpoint_problems(tag_dir, only="model") == [p for p in problems if "model/" in p]


def test_manifest_hashes_large_files_in_pieces_shared_across_ranks(tmp_path):
    import megatron_tinyllama.checkpoint.manifest as manifest_module

    tag_dir = fake_checkpoint(tmp_path, 2, complete=False)
    big = tag_dir / "model" / "model-tp00-of-01.safetensors"
    big.write_bytes(bytes(range(256)) * 4000)  # 1,024,000 bytes: 16 pieces of 64 KiB
    manifest_module.write_manifest(tag_dir, chunk_bytes=64 << 10)
    (tag_dir / "trainer_state.json").write_text(json.dumps(MINIMAL_STATE))
    entry = json.loads((tag_dir / "manifest.json").read_text())["files"]["model/model-tp00-of-01.safetensors"]
    assert entry["bytes"] == 1_024_000 and len(entry["sha256_chunks"]) == 16
    assert checkpoint_problems(tag_dir) == []

    # Two ranks' shares: every piece once, the loads within one piece of each other although
    # one file holds nearly all the bytes (hashed whole, one rank would read 97% of them).
    pieces = [p for name, size in (("model/big", 1_024_000), ("a", 10_240), ("b", 100))
              for p in manifest_module._pieces(name, size, 64 << 10)]
    shares = manifest_module._deal_by_size(pieces, 2)
    assert sorted(p for share in shares for p in share) == sorted(pieces)
    loads = [sum(p[3] for p in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= 64 << 10, loads

    # One flipped byte in the 10th piece: the file is named corrupt, once.
    data = bytearray(big.read_bytes())
    data[9 * (64 << 10) + 7] ^= 1
    big.write_bytes(bytes(data))
    problems = checkpoint_problems(tag_dir)
    assert problems == [f"{big}: contents differ from when it was written (corrupt)"], problems


def test_manifest_written_before_pieces_still_verifies(tmp_path):
    """A manifest of whole-file blake2b digests (checkpoints saved before pieces and sha256) is
    checked as written: sound passes, a flipped byte is found."""
    import hashlib

    import megatron_tinyllama.checkpoint.manifest as manifest_module

    tag_dir = fake_checkpoint(tmp_path, 2, complete=False)
    big = tag_dir / "model" / "model-tp00-of-01.safetensors"
    big.write_bytes(bytes(range(256)) * 4000)
    files = {str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size,
                                           "blake2b": hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()}
             for p in tag_dir.rglob("*") if p.is_file()}
    (tag_dir / "manifest.json").write_text(json.dumps({"files": files}))
    (tag_dir / "trainer_state.json").write_text(json.dumps(MINIMAL_STATE))
    assert checkpoint_problems(tag_dir) == []
    data = bytearray(big.read_bytes())
    data[-1] ^= 1
    big.write_bytes(bytes(data))
    assert checkpoint_problems(tag_dir) == [f"{big}: contents differ from when it was written (corrupt)"]


def test_stage_sizes_its_data_from_where_it_started():
    cfg = job(None)
    state = TrainerState(stage_start_samples=80, stage_start_tokens=80 * 64, consumed_samples=80)
    remaining = (cfg.train.train_tokens - 80 * 64) // 64
    assert state.samples_needed(cfg, 8) == 80 + remaining + 8


def test_zero_stage_is_compared_as_it_ran(tmp_path):
    # 'auto' on 2 ranks of a tiny model: ZeRO-1 (it fits anywhere, and is the faster), recorded as
    # such; resuming with an explicit 1 fits, with an explicit 3 is another layout.
    fake_checkpoint(tmp_path / "a", 2, cfg=job(tmp_path / "a", parallel={"zero_stage": "auto"}))
    assert plan_start(job(tmp_path / "a", parallel={"zero_stage": 1}), world_size=2).kind == "resume"
    with pytest.raises(ConfigError, match=r"ZeRO 1 -> 3; the checkpoint has no layout-free"):
        plan_start(job(tmp_path / "a", parallel={"zero_stage": 3}), world_size=2)
    # A checkpoint from before the layout record ran 'auto' by the rule of its day (ZeRO-3 above
    # one data-parallel rank): resuming with an explicit 3 fits.
    fake_checkpoint(tmp_path / "b", 2, cfg=job(tmp_path / "b", parallel={"zero_stage": "auto"}), layout=None)
    assert plan_start(job(tmp_path / "b", parallel={"zero_stage": 3}), world_size=2).kind == "resume"
    # Written with 'auto' on 1 rank (ZeRO-1): ZeRO-3 shards are another layout.
    fake_checkpoint(tmp_path / "c", 2, world_size=1, cfg=job(tmp_path / "c", parallel={"zero_stage": "auto"}))
    with pytest.raises(ConfigError, match=r"ZeRO 1 -> 3; the checkpoint has no layout-free"):
        plan_start(job(tmp_path / "c", parallel={"zero_stage": 3}), world_size=1)


def test_save_dir_with_a_checkpoint_wins_over_continue_from_and_says_so(tmp_path, caplog):
    fake_checkpoint(tmp_path / "stage1", 10)
    cfg = job(tmp_path / "stage2", checkpoint={"continue_from": str(tmp_path / "stage1")})
    fake_checkpoint(tmp_path / "stage2", 3, cfg=cfg)
    with caplog.at_level(logging.INFO, logger="megatron_tinyllama.checkpoint.training"):
        plan = plan_start(cfg, world_size=2)
    assert plan.kind == "resume" and plan.candidates[0] == tmp_path / "stage2" / "global_step000003"
    lines = [r.getMessage() for r in caplog.records if "continue_from" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert (f"resuming from {tmp_path / 'stage2' / 'global_step000003'}" in lines[0]
            and f"checkpoint.continue_from={tmp_path / 'stage1'} is not used" in lines[0])


def test_resume_names_recipe_changes_that_alter_the_data_order_as_a_warning(tmp_path, caplog):
    blend = {"blend": ["0.7", "a", "0.3", "b"]}
    fake_checkpoint(tmp_path, 3, cfg=job(tmp_path, data=blend))
    (tmp_path / "latest").write_text("global_step000003")
    quiet = logging.getLogger("megatron_tinyllama.checkpoint.training")
    # Training longer keeps the order (data/loader.py): said at INFO, no warning.
    with caplog.at_level(logging.INFO, logger=quiet.name):
        plan_start(job(tmp_path, data=blend, train={"train_tokens": 64 * 8 * 20}), world_size=2)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "train.train_tokens: 5120 -> 10240" in caplog.text
    for change, named in [({"data": {"blend": ["0.5", "a", "0.5", "b"]}}, "data.blend: ['0.7', 'a'"),
                          ({"data": {**blend, "seed": 7}}, "data seed (data.seed, else parallel.seed): 1234 -> 7"),
                          ({"data": blend, "parallel": {"seed": 99}}, "1234 -> 99")]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=quiet.name):
            plan_start(job(tmp_path, **change), world_size=2)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "alter the data order" in warnings[0] and named in warnings[0], caplog.text
    # The same data seed spelled differently (data.seed equal to parallel.seed) is no change.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=quiet.name):
        plan_start(job(tmp_path, data={**blend, "seed": 1234}), world_size=2)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_full_disk_is_named_with_enospc_and_the_file(tmp_path, monkeypatch):
    """/dev/full fails every write with ENOSPC, as a full filesystem does."""
    import torch
    from safetensors import SafetensorError

    from megatron_tinyllama.checkpoint import native

    with pytest.raises(RuntimeError) as plain:  # the fault: torch's own message, no errno, no file
        torch.save({"x": torch.zeros(4)}, "/dev/full")
    assert "No space" not in str(plain.value) and "/dev/full" not in str(plain.value)
    with pytest.raises(native.CheckpointWriteError, match=r"^/dev/full: ENOSPC: No space left on device \("):
        native.save_torch_file({"x": torch.zeros(4)}, "/dev/full")

    # safetensors writes a temporary file and renames it (a link to /dev/full is replaced): its
    # error on a full 1 MB tmpfs, which names no file.
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(native, "save_file", full)
    shard = tmp_path / "model-tp00-of-01.safetensors"
    with pytest.raises(native.CheckpointWriteError, match=f"^{shard}: writing failed: .*No space left"):
        native.write_model_files(tmp_path, job(None).model, 0, 1, {"w": torch.zeros(4)})


def test_checkpoint_package_imports_run_one_way():
    """No module of checkpoint/ imports one that imports it back (lazy imports inside functions too)."""
    import ast

    import megatron_tinyllama.checkpoint as package

    root = Path(package.__file__).parent
    prefix = "megatron_tinyllama.checkpoint."
    graph = {}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        graph[path.stem] = {node.module[len(prefix):] for node in ast.walk(tree)
                            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(prefix)}
    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a < b and a in graph.get(b, ()))
    assert cycles == []


def test_a_layout_change_reshards_when_the_checkpoint_carries_the_layout_free_state(tmp_path):
    tag_dir = fake_checkpoint(tmp_path, 2, world_size=4)
    (tag_dir / "optim").mkdir()
    (tag_dir / "optim" / "index.json").write_text("{}")
    plan = plan_start(job(tmp_path, parallel={"tensor_parallel_size": 2}), world_size=2)
    assert plan.kind == "resume" and plan.candidates == [tag_dir]
    # What cannot be resharded is still refused, named.
    with pytest.raises(ConfigError, match=r"model.hidden_size: checkpoint 64, recipe 128") as err:
        plan_start(job(tmp_path, model={"hidden_size": 128}, parallel={"tensor_parallel_size": 2}), world_size=2)
    assert "tensor_parallel_size" not in str(err.value)


def test_a_layout_change_is_named_field_by_field():
    from megatron_tinyllama.checkpoint.compat import layout_change, saved_layout

    saved = {"data_parallel_size": 4, "tensor_parallel_size": 1, "zero_stage": 3, "node_local_ranks": 2}
    now = {"data_parallel_size": 2, "tensor_parallel_size": 2, "zero_stage": 3, "node_local_ranks": 1}
    assert layout_change(saved, now) == ["DP 4 -> 2", "TP 1 -> 2", "node-local sharding 2 -> off"]
    assert layout_change(saved, saved) == []
    # A checkpoint from before the layout record: derived from its recipe ('auto' as it ran).
    old = {"world_size": 4, "config": job(None, parallel={"zero_stage": "auto"}).to_dict()}
    assert saved_layout(old) == {"data_parallel_size": 4, "tensor_parallel_size": 1, "zero_stage": 3,
                                 "node_local_ranks": None}
    assert layout_change(saved_layout(old), {**now, "data_parallel_size": 1, "zero_stage": 1,
                                             "tensor_parallel_size": 1}) == ["DP 4 -> 1", "ZeRO 3 -> 1"]


def test_the_start_plan_decides_the_layout_and_each_candidates_load_before_anything_is_built(tmp_path):
    """One pure rule, before the build: node-local sharding and precision count as changes for a
    checkpoint of the previous format (DeepSpeed's files depend on them), a per-rank checkpoint
    loads at any layout, and every fallback is checked by the same rule."""
    layout = {"data_parallel_size": 4, "tensor_parallel_size": 1, "zero_stage": 3, "node_local_ranks": 2}
    old = fake_checkpoint(tmp_path / "a", 2, world_size=4, layout=layout,
                          cfg=job(tmp_path / "a", parallel={"hpz_partition_size": 2, "zero_stage": 3}))
    # The same 4 ranks on one node (node-local sharding off): refused before the build, named;
    # before, the start plan let it pass and the load failed after the engine was built.
    with pytest.raises(ConfigError, match=r"node-local sharding 2 -> off.*no layout-free optimizer state"):
        plan_start(job(tmp_path / "a", parallel={"zero_stage": 3}), world_size=4, local_world_size=4)
    zero3_hpz = {"hpz_partition_size": 2, "zero_stage": 3}
    plan = plan_start(job(tmp_path / "a", parallel=zero3_hpz), world_size=4, local_world_size=2)
    assert plan.methods == {old: "deepspeed"} and plan.target.node_local_ranks == 2
    # A precision change: DeepSpeed's fp32 files are another set; refused without optim/ ...
    with pytest.raises(ConfigError, match=r"train.precision bf16 -> fp32"):
        plan_start(job(tmp_path / "a", parallel=zero3_hpz, train={"precision": "fp32"}),
                   world_size=4, local_world_size=2)
    # ... loaded from the layout-free state with it.
    (old / "optim").mkdir()
    (old / "optim" / "index.json").write_text("{}")
    plan = plan_start(job(tmp_path / "a", parallel=zero3_hpz, train={"precision": "fp32"}),
                      world_size=4, local_world_size=2)
    assert plan.methods == {old: "layout-free"}
    # A per-rank checkpoint loads at any layout; a fallback that does not fit is left out.
    newer = fake_checkpoint(tmp_path / "b", 4, world_size=4, layout=layout, checkpoint_format=2)
    older = fake_checkpoint(tmp_path / "b", 2, world_size=4, layout=layout, model={"hidden_size": 1})
    payload = json.loads((older / "trainer_state.json").read_text())
    payload["config"]["model"]["hidden_size"] = 1
    (older / "trainer_state.json").write_text(json.dumps(payload))
    (tmp_path / "b" / "latest").write_text(newer.name)
    plan = plan_start(job(tmp_path / "b", parallel={"tensor_parallel_size": 2}), world_size=2)
    assert plan.candidates == [newer] and plan.methods == {newer: "per-rank"}
    assert plan.target.as_dict() == {"data_parallel_size": 1, "tensor_parallel_size": 2, "zero_stage": 1,
                                     "node_local_ranks": 1}


@pytest.mark.parametrize("field", ["step", "consumed_tokens", "config"])
def test_a_trainer_state_without_a_field_is_named_and_never_read_as_something_else(tmp_path, caplog, field):
    """A hand-edited trainer_state.json (or one from another tool) that lacks a field a resume
    needs: before, a missing ``step`` resumed "from step 0" with rc 0, a missing ``consumed_tokens``
    called the checkpoint incomplete without a word, a missing ``config`` reported every model
    field as "checkpoint None". Now the file and the field are named and the previous checkpoint
    is used; with none before it, the run refuses to start from scratch over it."""
    fake_checkpoint(tmp_path, 2)
    broken = fake_checkpoint(tmp_path, 4)
    payload = json.loads((broken / "trainer_state.json").read_text())
    del payload[field]
    (broken / "trainer_state.json").write_text(json.dumps(payload))
    (tmp_path / "latest").write_text(broken.name)
    with caplog.at_level(logging.WARNING):
        plan = plan_start(job(tmp_path), world_size=2)
    assert plan.candidates == [tmp_path / "global_step000002"]
    assert f"checkpoint global_step000004 is not used: {broken / 'trainer_state.json'}: field {field!r} is missing" in caplog.text
    assert "'latest' names global_step000004, which is not usable" in caplog.text
    # A field of the wrong type is named the same way; nothing usable left: refused, not restarted.
    (tmp_path / "global_step000002" / "trainer_state.json").write_text(json.dumps({**payload, "step": "2"}))
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError, match="no complete checkpoint is there"):
        plan_start(job(tmp_path), world_size=2)
    assert "checkpoint global_step000002 is not used" in caplog.text and "field 'step' is '2', not int" in caplog.text


def test_a_checkpoint_pruned_while_the_converter_reads_it_is_not_called_damaged(tmp_path, caplog, monkeypatch):
    """``tinyllama-convert-to-hf`` on a run that trains on with ``keep_last``: the checkpoint
    ``latest`` named is pruned while it is checked (a newer one saved meanwhile). Before, 5 of
    1,871 tries failed calling it damaged; now the checkpoints are listed again and the newest
    complete one is taken."""
    from megatron_tinyllama.checkpoint import training
    from megatron_tinyllama.checkpoint.native import MODEL_INDEX

    for step in (2, 4):
        tag_dir = fake_checkpoint(tmp_path, step)
        (tag_dir / "model" / MODEL_INDEX).write_text("{}")
    (tmp_path / "latest").write_text("global_step000004")
    real = training.checkpoint_problems

    def pruned_meanwhile(tag_dir, only=None):
        if tag_dir.name == "global_step000004" and tag_dir.exists():  # the trainer saves 6, prunes 4
            newer = fake_checkpoint(tmp_path, 6)
            (newer / "model" / MODEL_INDEX).write_text("{}")
            (tmp_path / "latest").write_text("global_step000006")
            shutil.rmtree(tag_dir)
            return [f"{tag_dir}/model/model-tp00-of-01.safetensors: missing"]
        return real(tag_dir, only=only)

    monkeypatch.setattr(training, "checkpoint_problems", pruned_meanwhile)
    with caplog.at_level(logging.INFO):
        assert training.resolve_model_dir(tmp_path) == tmp_path / "global_step000006" / "model"
    assert "damaged" not in caplog.text and "was pruned while it was read" in caplog.text
