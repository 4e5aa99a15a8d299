"""The loss-curve forecast on runs this repo did not train: the curves released with Luo et al.
(2025), 25M-400M models over 16k-72k steps under nine LR schedules (scaling/curves_data/, MIT).
Fitted on one cosine run, the law (scaling/forecast/law.py) must predict the other schedules as the
issue asks (mean error within 1% for constant + linear cooldown); the loader must refuse a file
whose LR column is not the schedule it claims."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_tinyllama.scaling.cli import main
from megatron_tinyllama.scaling.forecast.published import (
    CURVES_DIR,
    SCHEDULES,
    check_size,
    load_curve,
    schedule_lr,
)
from megatron_tinyllama.scaling.runs import RunFileError


@pytest.mark.parametrize("size", ["25", "100", "400"])
def test_one_cosine_run_predicts_the_other_published_schedules(size):
    """At the default burn-in (5 warm-ups) and lambda (0.999). Measured: constant + linear
    cooldown 0.67 / 0.27 / 0.24% mean (25M / 100M / 400M); the worst schedule is the 25M
    constant LR run 3x longer than the fitted one (1.96%)."""
    result = check_size(size)
    assert result["law"]["points"] >= 100 and result["law"]["C"] > 0
    cooldown = result["predict"]["wsdld_20000_24000"]
    assert cooldown["points"] >= 100 and cooldown["mean"] < 0.01  # the goal
    assert all(r["mean"] < 0.025 for r in result["predict"].values()), result["predict"]
    # The 24000-step runs, on the horizon fitted: within 1.1% on average.
    on_horizon = [r["mean"] for name, r in result["predict"].items() if "72000" not in name]
    assert max(on_horizon) < 0.011, result["predict"]
    # The first 30% of the 24000-step cosine lies inside the default burn-in: no forecast made.
    assert "fewer than 5 points" in result["first30"]["cosine_24000"]["error"]
    assert result["first30"]["cosine_72000"]["fitted_points"] >= 40


def test_without_the_annealing_term_the_cooldown_is_missed():
    """What the check can see: with lambda near 0 the annealing area is only the current LR drop
    (the loss tracking the LR of the moment, no memory of the decay), and the same points
    predict the 400M cooldown at 2.9% mean against the law's 0.24%."""
    law = check_size("400")["predict"]["wsdld_20000_24000"]["mean"]
    instantaneous = check_size("400", decay=1e-9)["predict"]["wsdld_20000_24000"]["mean"]
    assert instantaneous > 2 * law


def test_the_rebuilt_schedules_match_the_released_lr_column():
    for name in SCHEDULES:
        curve = load_curve("100", name)  # checks every row's lr against schedule_lr
        assert curve.lr.size == {"cosine_72000": 72000, "constant_72000": 72000}.get(
            name, 16000 if name.startswith("wsdcon") else 24000)
        assert curve.steps[0] >= 2160 and np.all(np.diff(curve.steps) > 0)
    lr = schedule_lr("wsdld_20000_24000")
    assert lr[2159] == pytest.approx(3e-4) and lr[20000] == pytest.approx(3e-4)
    assert lr[-1] == pytest.approx(3e-5 + 2.7e-4 / 4000)


def test_a_wrong_or_malformed_curve_file_is_named(tmp_path):
    folder = tmp_path / "csv_400"
    folder.mkdir()
    lines = (CURVES_DIR / "csv_400" / "wsdld_20000_24000.csv").read_text().splitlines()
    step, lr, loss = lines[5].split(",")
    bad = lines[:5] + [f"{step},{float(lr) * 2},{loss}"] + lines[6:]
    (folder / "wsdld_20000_24000.csv").write_text("\n".join(bad))
    with pytest.raises(RunFileError, match=r"wsdld_20000_24000.csv:6: lr .* is not the"):
        load_curve("400", "wsdld_20000_24000", tmp_path)
    (folder / "wsdld_20000_24000.csv").write_text("\n".join(lines[:5] + ["1,2"] + lines[6:]))
    with pytest.raises(RunFileError, match=r"wsdld_20000_24000.csv:6: expected three numbers"):
        load_curve("400", "wsdld_20000_24000", tmp_path)
    (folder / "wsdld_20000_24000.csv").write_text("step;lr;loss\n")
    with pytest.raises(RunFileError, match=r"wsdld_20000_24000.csv:1: expected the header"):
        load_curve("400", "wsdld_20000_24000", tmp_path)
    with pytest.raises(RunFileError, match="no schedule 'linear_24000'"):
        schedule_lr("linear_24000")


def test_forecast_published_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "published.json"
    assert main(["forecast-published", "--sizes", "400", "--burn-in-warmups", "1",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "curve law fitted on cosine_24000 (points from 1 warm-ups" in text
    assert "wsdld_20000_24000" in text and "first 30% of a cosine run" in text
    (data,) = json.loads(out.read_text())
    assert data["size"] == "400M" and data["burn_in_warmups"] == 1
    assert data["first30"]["cosine_24000"]["fitted_points"] > 30  # from the warm-up's end
    assert main(["forecast-published", "--curves-dir", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["25", "400"])
def test_the_live_band_holds_the_end_of_a_long_published_run(size, monkeypatch):
    """The cosine runs of 72,000 steps replayed through the trainer's live check (one check in
    ten). Their forecasts a third to three quarters of the way in sit 0.2-1% above the end (the
    law under-reads the annealing still to come); the band's term for it
    (``trust.annealing_unseen``) holds the end in 44 of 47 checks at both sizes, with a median
    width of 1.1% / 1.8% of the forecast. Without that term: 36 and 32 of 47 (the bootstrap band
    alone: 13 of 47 at 25M). A released run raises no alarm."""
    from megatron_tinyllama.scaling.forecast import trust
    from megatron_tinyllama.scaling.forecast.published import replay_live

    r = replay_live(size, "cosine_72000", every=10)
    assert r["checks"] == 47 and r["warned"] == 0
    assert r["inside"] >= 0.9 * r["checks"]
    assert np.median(r["band_widths"]) < 0.025  # wide enough to hold the end, not useless
    if size == "25":
        assert r["off_2pct"] >= 3 and r["off_2pct_no_caveat"] == 0

    from megatron_tinyllama.train import forecast_live

    monkeypatch.setattr(trust, "annealing_unseen", lambda *args: 0.0)
    monkeypatch.setattr(forecast_live, "annealing_unseen", lambda *args: 0.0)
    without = replay_live(size, "cosine_72000", every=10)
    assert without["inside"] < 0.8 * without["checks"]


def test_forecast_published_replays_the_live_check(tmp_path, capsys):
    out = tmp_path / "published.json"
    assert main(["forecast-published", "--sizes", "25", "--live-every", "40",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "live check replayed (one check in 40; burn-in 5 warm-ups)" in text
    (data,) = json.loads(out.read_text())
    live = data["live"]
    assert [r["name"] for r in live] == list(SCHEDULES)
    checks, inside = sum(r["checks"] for r in live), sum(r["inside"] for r in live)
    assert f"all: end inside the 95% band in {inside} of {checks} checks" in text
    assert all(len(r["band_widths"]) == r["checks"] for r in live)
    # The totals by schedule length (the runs of each length are their own split).
    long = [r for r in live if r["steps"] == 72000]
    assert (f"72000-step runs: end inside the 95% band in {sum(r['inside'] for r in long)} of "
            f"{sum(r['checks'] for r in long)} checks") in text
    assert checks > 30 and sum(r["warned"] for r in live) == 0
    assert main(["forecast-published", "--sizes", "25", "--live-every", "-1"]) == 2
    assert "--live-every must be >= 1" in capsys.readouterr().err
