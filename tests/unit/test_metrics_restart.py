"""metrics.jsonl after a kill and a resume: each step once, the restart recorded, nothing lost,
and the readers (the scaling fits' run reader, the demo's summary) see one run."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_tinyllama.config import config_from_dict, save_config
from megatron_tinyllama.train.metrics import SUPERSEDED, MetricsWriter, RunStart

STEP_TOKENS = 512


def _cfg(save_dir: Path, tb_dir: Path = None):
    tree = {"name": "killed", "model": {"preset": "tinyllama-debug"},
            "checkpoint": {"save_dir": str(save_dir)}}
    if tb_dir is not None:
        tree["logging"] = {"tensorboard_dir": str(tb_dir)}
    return config_from_dict(tree)


def _log(writer: MetricsWriter, step: int, loss: float, valid: float = None) -> None:
    writer.count_tokens(STEP_TOKENS)
    writer.log_train(step, {"train_loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens": step * STEP_TOKENS,
                            "samples": step * 8, "global_batch_size": 8, "skipped_steps": 0})
    if valid is not None:
        writer.log_eval(step, step * STEP_TOKENS, valid)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_resume_supersedes_the_steps_after_its_checkpoint_and_the_readers_see_one_run(tmp_path):
    from megatron_tinyllama.demo import _last_metrics
    from megatron_tinyllama.scaling.runs import load_stack_run

    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, tmp_path / "tb")
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    # The first attempt logs steps 1-6 (validation every 2), checkpoints at 4, and is killed while
    # writing step 7's line.
    first = MetricsWriter(cfg, 0, 1, start=RunStart("fresh", 0, 0))
    for step in range(1, 7):
        _log(first, step, 10.0 - step, valid=10.0 - step if step % 2 == 0 else None)
    first.close()
    metrics = run_dir / "metrics.jsonl"
    with open(metrics, "a") as handle:
        handle.write('{"step": 7, "train_lo')
    before = metrics.read_text()

    resumed = MetricsWriter(cfg, 0, 1, start=RunStart("resume", 4, 4 * STEP_TOKENS, str(run_dir / "global_step000004")))
    for step in range(5, 9):
        _log(resumed, step, 20.0 - step, valid=20.0 - step if step % 2 == 0 else None)
    resumed.close()

    records = _records(metrics)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    assert train == [(s, 10.0 - s) for s in range(1, 5)] + [(s, 20.0 - s) for s in range(5, 9)]
    events = [r for r in records if "event" in r]
    assert len(events) == 1 and records.index(events[0]) == 6  # after step 4's train and valid lines
    assert events[0]["event"] == "resume" and events[0]["step"] == 4 and events[0]["tokens"] == 4 * STEP_TOKENS
    assert events[0]["checkpoint"] == str(run_dir / "global_step000004") and events[0]["superseded"] == 4
    # Nothing is lost: the interrupted run's later lines, the cut one too, are kept aside verbatim.
    aside = (run_dir / SUPERSEDED).read_text().splitlines()
    assert json.loads(aside[0])["event"] == "superseded" and json.loads(aside[0])["after_step"] == 4
    old_lines = before.splitlines()
    assert aside[1:] == old_lines[-4:]  # step 5, step 6, its validation, and the cut step 7
    # The readers: the scaling fits take the last validation of the resumed run; the demo's summary.
    point = load_stack_run(run_dir)
    assert (point.tokens, point.loss("valid")) == (8 * STEP_TOKENS, 12.0)
    assert _last_metrics(run_dir) == (12.0, 12.0, 8, 8 * STEP_TOKENS)
    # A resume at the end of a finished run moves nothing and is still recorded.
    again = MetricsWriter(cfg, 0, 1, start=RunStart("resume", 8, 8 * STEP_TOKENS, "global_step000008"))
    again.close()
    assert _records(metrics)[:-1] == records and _records(metrics)[-1]["superseded"] == 0
    assert len((run_dir / SUPERSEDED).read_text().splitlines()) == len(aside)


def test_a_restart_without_a_checkpoint_moves_the_lost_steps_aside(tmp_path):
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir)
    first = MetricsWriter(cfg, 0, 1, start=RunStart("fresh", 0, 0))
    _log(first, 1, 9.0)
    first.close()
    again = MetricsWriter(cfg, 0, 1, start=RunStart("fresh", 0, 0))
    _log(again, 1, 8.0)
    again.close()
    records = _records(run_dir / "metrics.jsonl")
    assert [r.get("event") for r in records] == ["restart", None] and records[1]["train_loss"] == 8.0
    assert json.loads((run_dir / SUPERSEDED).read_text().splitlines()[1])["train_loss"] == 9.0
