"""tinyllama-scaling end to end: paper check, plan, fit on own runs, predict, plot, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_tinyllama.config import config_from_dict, load_config, save_config
from megatron_tinyllama.scaling.cli import main, parse_count
from megatron_tinyllama.scaling.fit import LossLaw
from megatron_tinyllama.scaling.protocol import load_fit, reproduce
from megatron_tinyllama.scaling.runs import find_testbed_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
# What the paper reports for its held-out RedPajama runs (relative error on C4-eval loss, and on
# the 17-task average top-1 error with the 1.4B M=20 run added to the error-law fit).
PAPER = {("open_lm_1b", 640): (0.007, 0.036), ("open_lm_7b", 20): (0.007, 0.0005)}


@pytest.fixture(scope="module")
def testbed_dir() -> Path:
    return find_testbed_dir()


@pytest.fixture(scope="module")
def reproduced(testbed_dir):
    return {ds: (law, checks) for ds, law, checks in reproduce(testbed_dir)}


def test_reproduces_the_papers_held_out_predictions(reproduced):
    law, checks = reproduced["rpj"]
    assert [p.name for p in law.loss_points] == [
        "rpj-d=96_l=8_h=4-1.0",
        "rpj-d=512_l=8_h=4-1.0",
        "rpj-d=576_l=24_h=8-1.0",
        "rpj-d=1024_l=24_h=8-1.0",
        "rpj-d=96_l=8_h=4-16.0",
    ]
    assert [p.name for p in law.error_points][-1] == "rpj-open_lm_1b-1.0"
    found = {(c.run.shape, round(c.run.multiplier)): c for c in checks}
    assert set(found) == set(PAPER)
    for key, (paper_loss, paper_err) in PAPER.items():
        c = found[key]
        assert c.loss_relative_error < 0.015
        assert abs(c.loss_relative_error - paper_loss) < 0.001, key
        assert abs(c.error_relative_error - paper_err) < 0.002, key
        assert c.notes, "held-out runs lie beyond the fit and must say so"


def test_c4_and_refinedweb_fits(reproduced):
    for ds in ("c4_original", "rw_original"):
        law, checks = reproduced[ds]
        assert 0 < law.loss_fit.law.eta < 0.5 and 1.0 < law.loss_fit.law.E < 2.5
        assert len(checks) == 2 and {c.run.shape for c in checks} == {"open_lm_1b", "open_lm_7b"}
        for c in checks:
            assert c.loss_relative_error < 0.05 and c.error_relative_error < 0.1


def test_reproduce_command_prints_the_table(capsys):
    assert main(["reproduce"]) == 0
    out = capsys.readouterr().out
    for name in (
        "rpj-open_lm_1b-32.0",
        "rpj-open_lm_7b-1.0",
        "c4_original-open_lm_7b-1.0",
        "rw_original-open_lm_1b-16.0",
    ):
        assert name in out
    assert "Eq. 4" in out and "Eq. 5" in out and "0.7%" in out


def test_tools_wrapper_runs(testbed_dir):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tools" / "scaling_law.py"),
            "reproduce",
            "--datasets",
            "rpj",
            "--testbed-dir",
            str(testbed_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "rpj-open_lm_1b-32.0" in proc.stdout


def test_plan_writes_loadable_recipes_from_released_hyperparameters(tmp_path, capsys, testbed_dir):
    from megatron_tinyllama.model.presets import get_preset

    out = tmp_path / "plan"
    argv = [
        "plan",
        "--out-dir",
        str(out),
        "--multipliers",
        "5",
        "20",
        "640",
        "--override",
        "data.blend=data/x_text_document",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "total: 12 runs" in text and "gain-only" in text
    files = sorted(out.glob("*.yaml"))
    assert len(files) == 12 and (out / "plan.txt").exists()
    cfg = load_config(out / "testbed-d1024-l24-h8-M640.yaml")
    hp = json.loads((testbed_dir / "models" / "rpj-d=1024_l=24_h=8-1.0.json").read_text())[
        "hyperparameters"
    ]
    n = get_preset("testbed-d1024-l24-h8").num_parameters()
    batch_tokens = hp["global_bs"] * cfg.model.seq_length
    assert cfg.model.preset == "testbed-d1024-l24-h8"
    assert cfg.train.train_tokens == round(640 * n)
    assert cfg.train.global_batch_tokens == batch_tokens
    assert cfg.optimizer.warmup_tokens == hp["warmup"] * batch_tokens
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.weight_decay) == (
        hp["lr"],
        hp["cd"],
        hp["wd"],
    )
    assert (cfg.model.z_loss_weight, cfg.model.qk_layernorm) == (hp["z_loss"], hp["qk_norm"])
    assert cfg.data.blend == ("data/x_text_document",)
    assert cfg.checkpoint.save_dir == "runs/testbed-d1024-l24-h8-M640"


def test_plan_7b_takes_the_launched_batch(capsys, testbed_dir):
    raw = json.loads((testbed_dir / "models" / "rpj-open_lm_7b-1.0.json").read_text())
    args = raw["open_lm_args"]
    launched = int(args[args.index("--global-batch-size") + 1])
    assert raw["hyperparameters"]["global_bs"] != launched
    assert main(["plan", "--presets", "open_lm_7b", "--multipliers", "20"]) == 0
    out = capsys.readouterr().out
    assert f"using {launched}" in out


def test_plan_bad_input(capsys):
    assert main(["plan", "--presets", "tinyllama-debug"]) == 2
    err = capsys.readouterr().err
    assert (
        "preset 'tinyllama-debug'" in err
        and "--global-batch-size" in err
        and "Traceback" not in err
    )
    assert (
        main(
            [
                "plan",
                "--presets",
                "no-such-preset",
                "--global-batch-size",
                "8",
                "--warmup-steps",
                "1",
            ]
        )
        == 2
    )
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err


def _own_runs(root: Path, law: LossLaw) -> list[Path]:
    """Six small runs of this stack whose final valid_loss follows ``law``."""
    shapes = [(64, 2, 20), (128, 2, 20), (128, 4, 20), (256, 4, 20), (64, 2, 320), (128, 2, 80)]
    dirs = []
    for hidden, layers, mult in shapes:
        cfg = config_from_dict(
            {
                "name": f"d{hidden}-l{layers}-M{mult}",
                "model": {"preset": "tinyllama-debug", "hidden_size": hidden, "num_layers": layers},
            }
        )
        n = cfg.model.num_parameters()
        tokens = mult * n
        run = root / cfg.name
        run.mkdir(parents=True)
        save_config(cfg, run / "config.yaml")
        lines = [
            {"step": 1, "tokens": tokens // 2, "valid_loss": 9.0},
            {"step": 2, "tokens": tokens, "valid_loss": float(law.at(n, tokens))},
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        dirs.append(run)
    return dirs


def test_fit_on_own_runs_then_predict_from_the_fit_file(tmp_path, capsys):
    truth = LossLaw(E=2.0, a=60.0, b=150.0, eta=0.12)
    dirs = _own_runs(tmp_path / "runs", truth)
    fit_json = tmp_path / "fit.json"
    assert main(["fit", "--runs", *map(str, dirs), "--out", str(fit_json)]) == 0
    assert "loss law only" in capsys.readouterr().out
    law = load_fit(fit_json)
    assert law.eval_set == "valid" and law.error_fit is None
    assert law.loss_fit.law.eta == pytest.approx(truth.eta, rel=1e-3)
    assert law.loss_fit.law.E == pytest.approx(truth.E, rel=1e-3)
    assert (
        main(
            [
                "predict",
                "--fit",
                str(fit_json),
                "--params",
                "2e6",
                "--tokens",
                "8e8",
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    predicted = float(out.split("predicted loss (valid):")[1].split()[0])
    assert predicted == pytest.approx(float(truth.at(2e6, 8e8)), abs=1e-3)

    assert main(["fit", "--runs", *map(str, dirs[:3])]) == 2
    assert "at least 5 points" in capsys.readouterr().err


def test_fit_bad_run_folder_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    save_config(config_from_dict({"model": {"preset": "tinyllama-debug"}}), run / "config.yaml")
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "tokens": 5, "train_loss": 3.0}) + "\n"
    )
    assert main(["fit", "--runs", str(run)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "valid_loss" in err and "Traceback" not in err
    assert main(["fit", "--testbed-dir", str(tmp_path / "nowhere")]) == 2
    assert "testbed not found" in capsys.readouterr().err
    (tmp_path / "fit.json").write_text("{}")
    assert main(["predict", "--fit", str(tmp_path / "fit.json")]) == 2
    assert "not a fit file" in capsys.readouterr().err


def test_predict_tinyllama_warns_outside_the_fit(capsys):
    assert main(["predict", "--bootstrap", "40"]) == 0
    captured = capsys.readouterr()
    assert "tinyllama-1.1b" in captured.out and "M=2727" in captured.out
    loss = float(captured.out.split("predicted loss (c4_val):")[1].split()[0])
    assert 2.0 < loss < 3.0 and "95% CI [" in captured.out
    assert "predicted 17-task average top-1 error" in captured.out
    assert (
        "WARNING" in captured.err and "M=2727 is outside the fitted range [20, 320]" in captured.err
    )


def test_predict_inside_the_fit_has_no_warning(capsys):
    # 0.1B params at M=20: compute and multiplier inside what the Table 1 runs cover.
    assert main(["predict", "--params", "0.1B", "--multiplier", "20", "--bootstrap", "0"]) == 0
    assert "WARNING" not in capsys.readouterr().err


@pytest.mark.parametrize("target", [["--target", "1.1B:3T"], []], ids=["target", "no-target"])
def test_plot_writes_pngs(tmp_path, capsys, target):
    import matplotlib.image as mpimg

    # Without --target (the plainest use) the held-out testbed runs, whose 6ND passes 2^63 as
    # Python ints, are the only targets: the compute axis was an object array (issue 28 item 11).
    assert main(["plot", "--out-dir", str(tmp_path), *target]) == 0
    for name in ("loss_vs_compute.png", "error_vs_loss.png"):
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 20_000
        img = mpimg.imread(path)
        assert img.shape[0] > 400 and img.shape[1] > 600 and float(np.std(img)) > 0.05


def test_parse_count():
    assert (
        parse_count("3T") == 3e12
        and parse_count("1.1B") == pytest.approx(1.1e9)
        and parse_count("2.5e9") == 2.5e9
    )
    with pytest.raises(Exception, match="not a count"):
        parse_count("lots")
