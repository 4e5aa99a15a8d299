"""This module owns checking the loss-curve forecast on published runs: the loss curves released
with Luo et al. (2025), "A Multi-Power Law for Loss Curve Prediction Across Learning Rate
Schedules" (arXiv 2503.12811; MIT, shipped in ``scaling/curves_data/``, see its PROVENANCE.md):
models of 25M, 100M and 400M parameters trained for 16k-72k steps under nine LR schedules.

These are runs in the regime the curve law of Tissue et al. was written for (thousands of steps
of models far bigger than a CPU trains), so they measure the forecast where the CPU benchmark's
tiny models cannot. The LR of every step is rebuilt from the release's description (the table in
PROVENANCE.md) and checked against each file's ``lr`` column; the law, its areas, its fit and its
caveats are this stack's own (:mod:`.law`, :mod:`.predict`, :mod:`.trust`), exactly as a run's forecast uses
them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from megatron_tinyllama.scaling.errors import RunFileError
from megatron_tinyllama.scaling.forecast.law import DEFAULT_DECAY, fit_curve, lr_areas
from megatron_tinyllama.scaling.forecast.predict import BURN_IN_WARMUPS, check_burn_in
from megatron_tinyllama.scaling.forecast.trust import (
    annealing_share,
    burn_in_spread,
    fit_caveats,
    holdout,
    refit_final_loss,
)

CURVES_DIR = Path(__file__).resolve().parents[1] / "curves_data"
"""The release's curves, shipped with the package beside the testbed's data (setup.py's
package_data of ``megatron_tinyllama.scaling``)."""
SIZES = ("25", "100", "400")
"""Model sizes of the release, in millions of parameters (folders ``csv_<size>``)."""
SCHEDULES = ("cosine_24000", "cosine_72000", "constant_24000", "constant_72000",
             "wsd_20000_24000", "wsdld_20000_24000", "wsdcon_3", "wsdcon_9", "wsdcon_18")
WARMUP_STEPS, PEAK_LR, END_LR = 2160, 3e-4, 3e-5
FIT_ON = "cosine_24000"
"""The one run the law is fitted on (the issue's protocol: one cosine run)."""


def schedule_lr(name: str) -> np.ndarray:
    """The LR of every step (0-based) of a published schedule (PROVENANCE.md's table)."""
    kind, _, arg = name.partition("_")
    if name not in SCHEDULES:
        raise RunFileError(f"published curves: no schedule {name!r} "
                           f"(known: {', '.join(SCHEDULES)})")
    total = {"wsd": 24000, "wsdld": 24000, "wsdcon": 16000}.get(kind) or int(arg)
    i = np.arange(total, dtype=float)
    if kind == "cosine":
        lr = END_LR + 0.5 * (PEAK_LR - END_LR) * (1 + np.cos(math.pi * (i - WARMUP_STEPS)
                                                             / (total - WARMUP_STEPS)))
    elif kind in ("wsd", "wsdld"):
        decay_from = int(arg.split("_")[0])
        f = np.clip((i - decay_from) / (total - decay_from), 0.0, 1.0)
        # wsd: geometric interpolation between the peak and the end LR; wsdld: linear.
        lr = PEAK_LR ** (1 - f) * END_LR ** f if kind == "wsd" else PEAK_LR + (END_LR - PEAK_LR) * f
    elif kind == "wsdcon":
        lr = np.where(i < 8000, PEAK_LR, int(arg) * 1e-5)
    else:
        lr = np.full(total, PEAK_LR)
    lr[:WARMUP_STEPS] = np.linspace(0.0, PEAK_LR, WARMUP_STEPS)
    return lr


@dataclass(frozen=True)
class PublishedCurve:
    """One released run: its measured points and the LR of every step of its schedule."""

    size: str
    name: str
    steps: np.ndarray
    """Steps of the measured points (the loss after step ``s`` was taken at LR ``lr[s]``)."""
    loss: np.ndarray
    lr: np.ndarray
    """LR of every step of the schedule, 0-based."""


def load_curve(size: str, name: str, curves_dir: Union[str, Path] = CURVES_DIR) -> PublishedCurve:
    """One released run, its ``lr`` column checked against :func:`schedule_lr`.

    Raises:
        RunFileError: a missing or malformed file, named with its line, or an ``lr`` column that
            is not the schedule's.
    """
    path = Path(curves_dir) / f"csv_{size}" / f"{name}.csv"
    lr = schedule_lr(name)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise RunFileError(f"{path}: cannot read ({err.strerror})") from None
    if not lines or lines[0].strip() != "step,lr,loss":
        raise RunFileError(f"{path}:1: expected the header 'step,lr,loss'")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            step, rate, loss = (float(v) for v in line.split(","))
        except ValueError:
            raise RunFileError(f"{path}:{number}: expected three numbers, "
                               f"got {line.strip()!r}") from None
        if not step.is_integer() or not math.isfinite(loss):
            raise RunFileError(f"{path}:{number}: step must be an integer and loss finite")
        if step < lr.size:  # the release's loader also drops a point at the last step
            if abs(rate - lr[int(step)]) > 1e-9 * max(rate, lr[int(step)]):
                raise RunFileError(f"{path}:{number}: lr {rate!r} at step {int(step)} is not the "
                                   f"{name} schedule's {lr[int(step)]!r}")
            rows.append((int(step), loss))
    if len(rows) < 5:
        raise RunFileError(f"{path}: {len(rows)} points within the schedule; need at least 5")
    steps, loss = (np.array(v) for v in zip(*rows))
    return PublishedCurve(size=str(size), name=name, steps=steps, loss=loss, lr=lr)


def _points(curve: PublishedCurve, burn_in_warmups: float, until_step: Optional[int] = None):
    """Step indices and losses of ``curve``'s points from the burn-in on (up to ``until_step``)."""
    keep = curve.steps >= max(WARMUP_STEPS, burn_in_warmups * WARMUP_STEPS)
    if until_step is not None:
        keep &= curve.steps <= until_step
    return curve.steps[keep], curve.loss[keep]


def _errors(pred: np.ndarray, measured: np.ndarray) -> dict:
    rel = np.abs(pred - measured) / measured
    return {"points": int(rel.size), "mean": float(rel.mean()), "max": float(rel.max()),
            "last": float(rel[-1])}


def check_size(size: str, *, burn_in_warmups: float = BURN_IN_WARMUPS,
               decay: float = DEFAULT_DECAY, curves_dir: Union[str, Path] = CURVES_DIR) -> dict:
    """The forecast's checks on one model size of the release.

    * The law fitted on :data:`FIT_ON` (its points from the burn-in on) predicts every other
      schedule over its points from the burn-in on: mean, max and last relative error.
    * Fitted on the first 30% of each cosine run, it forecasts that run's last point: the error,
      the forecast's burn-in spread and its caveats (:func:`~.forecast.fit_caveats`).

    Raises:
        RunFileError: a bad file; FitError: a burn-in that is not a finite number >= 0, or too
            few points past it to fit.
    """
    check_burn_in(burn_in_warmups)
    curves = {name: load_curve(size, name, curves_dir) for name in SCHEDULES}
    # The areas of each schedule once (a loop over up to 72000 steps).
    areas = {name: lr_areas(c.lr, 1.0, 1.0, decay) for name, c in curves.items()}
    idx, y = _points(curves[FIT_ON], burn_in_warmups)
    fit = fit_curve(areas[FIT_ON].s1[idx], areas[FIT_ON].s2[idx], y)
    law = fit.law
    out: dict = {"size": f"{size}M", "fit_on": FIT_ON, "burn_in_warmups": burn_in_warmups,
                 "decay": decay,
                 "law": {"L0": law.L0, "A": law.A, "alpha": law.alpha, "C": law.C,
                         "points": fit.num_points, "rms_residual": fit.rms_residual},
                 "predict": {}, "first30": {}}
    for name, curve in curves.items():
        if name == FIT_ON:
            continue
        t_idx, t_y = _points(curve, burn_in_warmups)
        out["predict"][name] = _errors(law(areas[name].s1[t_idx], areas[name].s2[t_idx]), t_y)
    for name in ("cosine_24000", "cosine_72000"):
        curve, c_areas = curves[name], areas[name]
        until = int(0.3 * curve.lr.size)
        c_idx, c_y = _points(curve, burn_in_warmups, until)
        end_s1, end_s2 = c_areas.s1[curve.steps[-1]], c_areas.s2[curve.steps[-1]]
        if c_idx.size < 5:
            out["first30"][name] = {"fitted_points": int(c_idx.size),
                                    "error": "fewer than 5 points past the burn-in"}
            continue
        early = fit_curve(c_areas.s1[c_idx], c_areas.s2[c_idx], c_y)
        final = float(early.law(end_s1, end_s2))

        def refit_final(burn: float, curve=curve, c_areas=c_areas, until=until):
            b_idx, b_y = _points(curve, burn, until)
            return refit_final_loss(c_areas.s1[b_idx], c_areas.s2[b_idx], b_y, end_s1, end_s2)

        spread = burn_in_spread(final, refit_final, burn_in_warmups)
        seen = annealing_share(c_areas, int(c_idx[-1]))
        held = holdout(c_areas.s1[c_idx], c_areas.s2[c_idx], c_y, c_idx, int(curve.steps[-1]),
                       end_s1, end_s2, fit=early)
        measured = float(curve.loss[-1])
        out["first30"][name] = {
            "fitted_points": int(c_idx.size), "forecast_end": final, "measured_end": measured,
            "end_error": abs(final - measured) / measured, "burn_in_spread": spread,
            # No band here: the band-below-zero caveat reads the forecast end alone.
            "caveats": list(fit_caveats(early, seen, final, final, spread, held,
                                        float(end_s2 - c_areas.s2[int(c_idx[-1])])))}
    return out


def replay_live(size: str, name: str, *, every: int = 1, curves_dir: Union[str, Path] = CURVES_DIR,
                **live_options) -> dict:
    """One released run's points replayed through the trainer's live check
    (:class:`~megatron_tinyllama.train.forecast_live.LiveForecast`), as if it were evaluated at
    each of them: how often its forecast of the final loss held the run's measured end.

    Args:
        every: check one point in ``every`` (the others are still observed and fitted), to cut the
            cost of a quick look; 1 checks all.
        live_options: passed to ``LiveForecast`` (``burn_in_warmups``, ``min_points``, ...).

    Returns:
        ``{"size", "name", "steps", "checks", "inside", "off_2pct", "off_2pct_no_caveat",
        "within_2pct_caveat", "warned", "end", "band_widths"}``: the schedule's length, checks
        made, those whose final band held the measured end, those more than 2% off the end (and
        of them without a caveat), those within 2% that carry a caveat anyway, false alarms (a
        released run has no fault, so every warning is one) and each check's final band width
        over its forecast (so a band that holds the end by being useless shows).
    """
    from megatron_tinyllama.scaling.forecast.history import Schedule, Segment
    from megatron_tinyllama.train.forecast_live import LiveForecast

    curve = load_curve(size, name, curves_dir)
    n = curve.lr.size
    # Step s (0-based, as the release counts) is the schedule's index s: its "tokens" are s + 1.
    schedule = Schedule(tokens=np.arange(1, n + 1, dtype=float), lr=curve.lr,
                        step_tokens=np.ones(n), segment=np.zeros(n, dtype=int),
                        segments=(Segment(name=name, start_tokens=0, end_tokens=n, batch_tokens=1,
                                          optimizer=None, schedule_tokens=n),))
    live = LiveForecast(schedule, **live_options)
    end = float(curve.loss[-1])
    out = {"size": f"{size}M", "name": name, "steps": int(n), "checks": 0, "inside": 0,
           "off_2pct": 0, "off_2pct_no_caveat": 0, "within_2pct_caveat": 0, "warned": 0,
           "end": end, "band_widths": []}
    for i, (step, loss) in enumerate(zip(curve.steps, curve.loss)):
        if i % every:
            live.points.add(int(step) + 1, int(step), float(loss))
            continue
        check = live.observe(int(step), int(step) + 1, float(loss))
        if check is None:
            continue
        out["checks"] += 1
        out["inside"] += int(check.final_low <= end <= check.final_high)
        off = abs(check.final_loss - end) / end > 0.02
        out["off_2pct"] += int(off)
        out["off_2pct_no_caveat"] += int(off and not check.caveats)
        out["within_2pct_caveat"] += int(not off and bool(check.caveats))
        out["warned"] += int(check.warned)
        out["band_widths"].append(round((check.final_high - check.final_low)
                                        / abs(check.final_loss), 6))
    return out


def live_totals(reps: list[dict]) -> dict:
    """:func:`replay_live` results summed over runs: the counts, the share of checks whose band
    held the end, and the median and 90th percentile of the band's width (over the forecast)."""
    keys = ("checks", "inside", "off_2pct", "off_2pct_no_caveat", "within_2pct_caveat", "warned")
    out = {key: sum(r[key] for r in reps) for key in keys}
    widths = [w for r in reps for w in r["band_widths"]]
    out["inside_share"] = out["inside"] / max(out["checks"], 1)
    out["width_median"] = float(np.median(widths)) if widths else None
    out["width_p90"] = float(np.percentile(widths, 90)) if widths else None
    return out
