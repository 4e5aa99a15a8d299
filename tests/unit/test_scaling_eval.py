"""tinyllama-scaling fits Err(L) (Eq. 5) on this stack's runs from tinyllama-eval's results files.

Synthetic runs: each run folder holds config.yaml, metrics.jsonl whose final validation loss
follows a known L(C, M), and eval_results.json (written by the evaluation package's own writer)
whose multiple-choice accuracies average to a known Err(L). The fit must recover both laws with no
hand editing, average only the multiple-choice tasks, and pair loss and error of the same weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megatron_tinyllama.config import config_from_dict, save_config
from megatron_tinyllama.evaluation.report import EvalReport, TaskResult, save_report
from megatron_tinyllama.evaluation.suites import SUITES
from megatron_tinyllama.scaling.cli import main
from megatron_tinyllama.scaling.fit import ErrorLaw, LossLaw
from megatron_tinyllama.scaling.protocol import load_fit
from megatron_tinyllama.scaling.runs import RunFileError, load_stack_run

LOSS_LAW = LossLaw(E=2.0, a=60.0, b=150.0, eta=0.12)
ERROR_LAW = ErrorLaw(epsilon=0.85, k=2.0, gamma=0.6)
COMMONSENSE = [t.name for t in SUITES["commonsense"]]
OFFSETS = [-0.03, -0.02, -0.01, 0.0, 0.01, 0.02, 0.03]  # per-task spread, mean zero


def _eval_report(error: float, tokens, limit=None) -> EvalReport:
    results = [TaskResult(t, 1.0 - error + off) for t, off in zip(SUITES["commonsense"], OFFSETS)]
    results.append(TaskResult(SUITES["instructeval"][1], 0.9))  # BBH: generative, not averaged
    return EvalReport(tuple(results), {"path": "ckpt", "kind": "checkpoint", "tokens": tokens},
                      "0.4.13", {"limit": limit})


def _runs(root: Path, with_eval: bool = True) -> list[Path]:
    shapes = [(64, 2, 20), (128, 2, 20), (128, 4, 20), (256, 4, 20), (64, 2, 320), (128, 2, 80)]
    dirs = []
    for hidden, layers, mult in shapes:
        cfg = config_from_dict({"name": f"d{hidden}-l{layers}-M{mult}", "model": {
            "preset": "tinyllama-debug", "hidden_size": hidden, "num_layers": layers}})
        n = cfg.model.num_parameters()
        tokens = mult * n
        loss = float(LOSS_LAW.at(n, tokens))
        run = root / cfg.name
        run.mkdir(parents=True)
        save_config(cfg, run / "config.yaml")
        lines = [{"step": 1, "tokens": tokens // 2, "valid_loss": loss + 1.0},
                 {"step": 2, "tokens": tokens, "train_loss": loss + 0.1},
                 {"step": 2, "tokens": tokens, "valid_loss": loss}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        if with_eval:
            save_report(_eval_report(float(ERROR_LAW(loss)), tokens), run / "eval_results.json")
        dirs.append(run)
    return dirs


def test_fit_runs_fits_the_error_law_from_eval_results(tmp_path, capsys):
    dirs = _runs(tmp_path / "runs")
    fit_json = tmp_path / "fit.json"
    assert main(["fit", "--runs", *map(str, dirs), "--out", str(fit_json)]) == 0
    out = capsys.readouterr().out
    assert "Eq. 5" in out and "7-task average top-1 error" in out
    law = load_fit(fit_json)
    assert law.tasks == tuple(COMMONSENSE)  # the multiple-choice tasks, not BBH
    assert law.error_fit.law.epsilon == pytest.approx(ERROR_LAW.epsilon, rel=1e-3)
    assert law.error_fit.law.k == pytest.approx(ERROR_LAW.k, rel=1e-3)
    assert law.error_fit.law.gamma == pytest.approx(ERROR_LAW.gamma, rel=1e-3)
    assert law.loss_fit.law.eta == pytest.approx(LOSS_LAW.eta, rel=1e-3)


def test_results_kept_elsewhere_are_given_with_eval(tmp_path, capsys):
    dirs = _runs(tmp_path / "runs")
    moved = tmp_path / "elsewhere.json"
    shutil.move(dirs[0] / "eval_results.json", moved)
    assert main(["fit", "--runs", *map(str, dirs)]) == 0
    assert "loss law only" in capsys.readouterr().out
    assert main(["fit", "--runs", *map(str, dirs), "--eval", f"{dirs[0]}={moved}"]) == 0
    assert "Eq. 5" in capsys.readouterr().out
    assert main(["fit", "--runs", *map(str, dirs[1:]), "--eval", f"{dirs[0]}={moved}"]) == 2
    assert "not given with --runs" in capsys.readouterr().err


def test_loss_is_taken_at_the_evaluated_checkpoint(tmp_path):
    run = _runs(tmp_path / "runs", with_eval=False)[0]
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    half = final["tokens"] // 2
    save_report(_eval_report(0.5, half), run / "eval_results.json")
    point = load_stack_run(run)
    assert (point.tokens, point.loss("valid")) == (half, pytest.approx(final["valid_loss"] + 1.0))
    assert point.average_error() == pytest.approx(0.5)
    save_report(_eval_report(0.5, half + 1), run / "eval_results.json")
    with pytest.raises(RunFileError, match=f"no validation loss at {half + 1:,} tokens"):
        load_stack_run(run)
    save_report(_eval_report(0.5, None), run / "eval_results.json")  # an HF export: no tokens
    assert load_stack_run(run).tokens == final["tokens"]


def test_smoke_test_results_and_bad_files_are_refused(tmp_path):
    run = _runs(tmp_path / "runs", with_eval=False)[0]
    save_report(_eval_report(0.5, None, limit=10), run / "eval_results.json")
    with pytest.raises(RunFileError, match="--limit 10"):
        load_stack_run(run)
    (run / "eval_results.json").write_text('{"format": "something else"}')
    with pytest.raises(RunFileError, match="eval_results.json: not a tinyllama-eval results file"):
        load_stack_run(run)
