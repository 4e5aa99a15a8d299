"""The demo's live-check summary: read from metrics.jsonl as the trainer writes it."""

import json

from megatron_tinyllama.demo import live_line
from megatron_tinyllama.train.forecast_live import summarize_live_checks


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_live_checks_are_counted_against_the_measured_end(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    check = lambda step, final, low, high, distance=0.0, **kw: {  # noqa: E731
        "step": step, "tokens": step * 10, "valid_loss": 4.0, "forecast_final_loss": final,
        "forecast_final_low": low, "forecast_final_high": high, "forecast_band_distance": distance, **kw}
    _write(metrics, [
        {"step": 8, "tokens": 80, "train_loss": 5.0},
        {"step": 8, "tokens": 80, "valid_loss": 5.0},               # before the first check
        check(16, 3.3, 3.2, 3.4),                                   # end 3.0 outside
        check(24, 3.1, 2.9, 3.2, distance=0.1),                     # an excursion begins
        check(32, 3.05, 2.9, 3.1, distance=0.2, forecast_caveats="misfit"),  # ... goes on
        check(40, 3.0, 2.95, 3.05),
        check(48, 2.97, 2.9, 3.02, distance=-0.1),                  # a second excursion
        {"event": "resume", "step": 48, "tokens": 480},
        {"step": 56, "tokens": 560, "valid_loss": 3.0},             # the measured end
    ])
    live = summarize_live_checks(metrics)
    assert (live.checks, live.first_step, live.measured_end, live.measured_end_step) == (5, 16, 3.0, 56)
    assert live.inside == 4 and live.caveated == 1 and live.warnings == 2
    assert abs(live.first_error - 0.1) < 1e-12 and abs(live.last_error - (2.97 / 3.0 - 1)) < 1e-12
    line = live_line(live)
    assert "5 forecasts of the final loss from step 16" in line and "inside their 95% band in 4 of 5" in line
    assert "+10.0%" in line and "2 warnings" in line


def test_no_checks_say_so(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write(metrics, [{"step": 8, "tokens": 80, "valid_loss": 5.0}])
    assert summarize_live_checks(metrics) is None
    assert "none made" in live_line(None)
