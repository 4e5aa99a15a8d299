"""Reading the released testbed and this stack's run folders; bad files name the field.

The testbed is located as the CLI does: the copy shipped inside the package.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import megatron_tinyllama
from megatron_tinyllama.config import config_from_dict, save_config
from megatron_tinyllama.scaling.runs import (
    PAPER_17_TASKS,
    PAPER_ERROR_EXTRA_RUNS,
    PAPER_LOSS_FIT_RUNS,
    PACKAGED_TESTBED,
    RunFileError,
    find_testbed_dir,
    held_out_runs,
    load_runs,
    load_stack_run,
    load_testbed,
    load_testbed_run,
    preset_for_shape,
    select_runs,
)


@pytest.fixture(scope="module")
def testbed_dir() -> Path:
    return find_testbed_dir()


@pytest.fixture(scope="module")
def testbed(testbed_dir):
    return load_testbed(testbed_dir)


def test_testbed_loads_every_run_with_c4_eval_and_17_tasks(testbed, testbed_dir):
    names = sorted(p.stem for p in (testbed_dir / "models").glob("*.json"))
    assert sorted(r.name for r in testbed) == names
    assert {r.dataset for r in testbed} == {"rpj", "c4_original", "rw_original"}
    for r in testbed:
        raw = json.loads(Path(r.source).read_text())
        hp = raw["hyperparameters"]
        assert (r.params, r.tokens) == (hp["params"], hp["tokens"])
        assert r.multiplier == pytest.approx(20 * hp["chinchilla_multiplier"], rel=1e-6)
        c4 = [res["loss"] for res in raw["results"] if "c4_val" in res["val_data"][0]]
        assert len(c4) == 1 and r.loss("c4_val") == c4[0]
        assert "paloma_c4_en" in r.losses and r.losses["paloma_c4_en"] != r.loss("c4_val")
        assert r.accuracies is not None and set(PAPER_17_TASKS) <= set(r.accuracies)


def test_average_error_is_mean_of_one_minus_fraction_accuracy(testbed, testbed_dir):
    run = next(r for r in testbed if r.name == "rpj-open_lm_7b-1.0")
    icl = json.loads(
        (testbed_dir / "evals" / "evaluation_rpj-open_lm_7b-1.0_heavy.json").read_text()
    )["eval_metrics"]["icl"]
    assert all(0 <= v <= 1 for v in icl.values())  # fractions, not percentages
    expected = sum(1 - icl[t] for t in PAPER_17_TASKS) / 17
    assert run.average_error() == pytest.approx(expected, rel=1e-12)
    assert "winograd" in PAPER_17_TASKS and "winogrande" not in PAPER_17_TASKS
    with pytest.raises(RunFileError, match="lacks task"):
        run.average_error(["no_such_task"])
    with pytest.raises(RunFileError, match="no validation loss for eval set 'nope'"):
        run.loss("nope")


def test_paper_protocol_selection(testbed):
    fit = select_runs(testbed, "rpj", PAPER_LOSS_FIT_RUNS)
    assert [(r.shape, round(r.multiplier)) for r in fit] == [
        (s, round(m)) for s, m in PAPER_LOSS_FIT_RUNS
    ]
    assert [round(r.params / 1e6) for r in fit] == [11, 79, 154, 412, 11]
    extra = select_runs(testbed, "rpj", PAPER_ERROR_EXTRA_RUNS)
    held = held_out_runs(testbed, "rpj", fit + extra)
    assert sorted((r.shape, round(r.multiplier)) for r in held) == [
        ("open_lm_1b", 640),
        ("open_lm_7b", 20),
    ]
    with pytest.raises(RunFileError, match="expected one run of rpj open_lm_1b at M=5"):
        select_runs(testbed, "rpj", [("open_lm_1b", 5.0)])


def test_find_testbed_dir(testbed_dir, tmp_path):
    # The default is the copy inside the package, with its licence and provenance beside it.
    assert testbed_dir == PACKAGED_TESTBED.resolve()
    assert testbed_dir.is_relative_to(Path(megatron_tinyllama.__file__).resolve().parent)
    assert "MIT License" in (testbed_dir.parent / "LICENSE.txt").read_text()
    assert "mlfoundations/scaling" in (testbed_dir.parent / "PROVENANCE.md").read_text()
    assert (
        find_testbed_dir(testbed_dir.parent) == testbed_dir
    )  # the folder holding exp_data works too
    with pytest.raises(RunFileError, match="testbed not found.*pass the testbed's exp_data"):
        find_testbed_dir(tmp_path)


def _copy_run(testbed_dir: Path, tmp_path: Path, name: str = "rpj-d=96_l=8_h=4-1.0") -> Path:
    (tmp_path / "models").mkdir()
    (tmp_path / "evals").mkdir()
    src = testbed_dir / "models" / f"{name}.json"
    dst = tmp_path / "models" / src.name
    shutil.copy(src, dst)
    shutil.copy(testbed_dir / "evals" / f"evaluation_{name}_heavy.json", tmp_path / "evals")
    return dst


def test_testbed_file_without_needed_fields(testbed_dir, tmp_path):
    path = _copy_run(testbed_dir, tmp_path)
    good = json.loads(path.read_text())
    assert load_testbed_run(path).params == good["hyperparameters"]["params"]

    bad = json.loads(path.read_text())
    del bad["hyperparameters"]["params"]
    path.write_text(json.dumps(bad))
    with pytest.raises(
        RunFileError, match=r"rpj-d=96_l=8_h=4-1\.0\.json: missing field 'hyperparameters\.params'"
    ):
        load_testbed_run(path)

    bad = json.loads(json.dumps(good))
    del bad["results"][1]["loss"]
    path.write_text(json.dumps(bad))
    with pytest.raises(RunFileError, match=r"results\[1\]: missing field 'loss'"):
        load_testbed_run(path)

    bad = json.loads(json.dumps(good))
    bad["hyperparameters"]["tokens"] = float("nan")
    path.write_text(json.dumps(bad))
    with pytest.raises(
        RunFileError, match="hyperparameters.tokens: expected a finite positive number"
    ):
        load_testbed_run(path)

    path.write_text("{not json")
    with pytest.raises(RunFileError, match="not valid JSON"):
        load_testbed_run(path)


def test_eval_file_in_percent_is_rejected(testbed_dir, tmp_path):
    path = _copy_run(testbed_dir, tmp_path)
    eval_path = tmp_path / "evals" / f"evaluation_{path.stem}_heavy.json"
    data = json.loads(eval_path.read_text())
    data["eval_metrics"]["icl"]["copa"] = 56.0
    eval_path.write_text(json.dumps(data))
    with pytest.raises(
        RunFileError, match="eval_metrics.icl.copa = 56.0 is not an accuracy fraction"
    ):
        load_testbed_run(path)


def _write_stack_run(run_dir: Path, records: list, **model) -> Path:
    run_dir.mkdir(parents=True)
    cfg = config_from_dict({"name": run_dir.name, "model": {"preset": "tinyllama-debug", **model}})
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    )
    return run_dir


def test_stack_run_reader(tmp_path):
    from megatron_tinyllama.model.presets import get_preset

    records = [
        {"step": 10, "tokens": 20480, "train_loss": 5.1, "lr": 1e-3},
        {"step": 10, "tokens": 20480, "valid_loss": 5.0},
        {"step": 20, "tokens": 40960, "train_loss": 4.6, "lr": 1e-3},
        {"step": 20, "tokens": 40960, "valid_loss": 4.5},
        {"step": 25, "tokens": 51200, "train_loss": 4.4, "lr": 1e-3},
    ]
    run_dir = _write_stack_run(tmp_path / "debug-run", records, hidden_size=128)
    run = load_stack_run(run_dir)
    assert run.params == get_preset("tinyllama-debug", hidden_size=128).num_parameters()
    assert (run.tokens, run.loss("valid")) == (40960, 4.5)
    assert run.shape == "tinyllama-debug" and run.dataset == "stack"
    assert load_stack_run(run_dir / "metrics.jsonl") == run
    assert load_runs([run_dir]) == [run]


def test_stack_run_bad_input(tmp_path):
    with pytest.raises(RunFileError, match=r"config\.yaml: missing"):
        load_stack_run(tmp_path)
    no_valid = _write_stack_run(tmp_path / "a", [{"step": 1, "tokens": 10, "train_loss": 3.0}])
    with pytest.raises(RunFileError, match=r"a/metrics\.jsonl: no record with field 'valid_loss'"):
        load_stack_run(no_valid)
    no_tokens = _write_stack_run(
        tmp_path / "b",
        [{"step": 1, "tokens": 10, "train_loss": 3.0}, {"step": 1, "valid_loss": 3.0}],
    )
    with pytest.raises(
        RunFileError, match=r"b/metrics\.jsonl:2: record with 'valid_loss' lacks field 'tokens'"
    ):
        load_stack_run(no_tokens)
    bad_json = _write_stack_run(
        tmp_path / "c", [{"step": 1, "tokens": 10, "valid_loss": 3.0}, "{oops"]
    )
    with pytest.raises(RunFileError, match=r"c/metrics\.jsonl:2: not valid JSON"):
        load_stack_run(bad_json)
    nan_loss = _write_stack_run(tmp_path / "d", ['{"step": 1, "tokens": 10, "valid_loss": NaN}'])
    with pytest.raises(RunFileError, match=r"d/metrics\.jsonl:1: field 'valid_loss'"):
        load_stack_run(nan_loss)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.yaml").write_text("model: {no_such_field: 1}\n")
    with pytest.raises(RunFileError, match="not a valid JobConfig"):
        load_stack_run(tmp_path / "e")
    with pytest.raises(RunFileError, match="not a testbed model JSON nor a run folder"):
        load_runs([tmp_path / "missing.txt"])


def test_preset_for_shape():
    from megatron_tinyllama.model.presets import PRESETS

    for shape in (
        "d=96_l=8_h=4",
        "d=512_l=8_h=4",
        "d=576_l=24_h=8",
        "d=1024_l=24_h=8",
        "open_lm_1b",
        "open_lm_7b",
    ):
        assert preset_for_shape(shape) in PRESETS
