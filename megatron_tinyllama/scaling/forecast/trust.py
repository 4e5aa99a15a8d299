"""This module owns how far a loss-curve forecast can be trusted: the caveats read off its fit,
and the final band that adds the law's own uncertainty to the bootstrap's resampled residuals.

The bootstrap band of :func:`~.law.bootstrap_band` says how much the evaluation noise moves the
fit. It does not say how much the law itself is wrong for this run, and on curves as clean as the
published ones (residuals of 0.01%) it was a few hundredths of a percent wide while the forecasts
missed by 0.3-4%: the true end was inside the "95%" band in 46% of the live checks replayed on
them. Four uncertainties of the law are added (:func:`final_band`):

* **The burn-in.** The forecast refitted with the burn-in halved and raised by half
  (:func:`burn_in_finals`): which early points are fitted.
* **The drift.** The forecast refitted on the first two thirds of the fitted points
  (:func:`holdout`): how far the end moved over the last third, grown with the square root of the
  distance still to go (a forecast that drifted by d over k steps may drift by about
  d * sqrt(m / k) over the m steps to the end, as a random walk would).
* **An annealing not yet seen.** A fit with C = 0 and less than half of the schedule's annealing
  area measured cannot know what the LR decay will remove: the band's lower end is opened by
  :data:`NO_ANNEALING_LOW` of the forecast.
* **The annealing still to come** (:func:`annealing_unseen`). A fit with C > 0 takes
  ``C * (S2_end - S2_last)`` off the loss for the annealing after its last point, with C read off
  the share ``s`` of the schedule's annealing area it has seen: that part of the forecast is an
  extrapolation along the annealing area, trusted in proportion to what was seen. The band spans
  it by ``(1 - s)`` of it on each side: all of it when no annealing was seen, none once all was.
  On the published 72,000-step cosine runs the forecasts made a third to three quarters of the
  way in sat 0.2-1.0% above the end, 20-35% of the annealing gain still to come (C rose from 0.42
  to 0.66 along the 400M run as more of the decay was measured), up to 52 checks in a row,
  with drift-based bands narrower than that.

Pure functions on arrays (no I/O), shared by the ``forecast`` command, the live check and the
published-curve checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from megatron_tinyllama.scaling.errors import FitError
from megatron_tinyllama.scaling.forecast.law import ALPHA_GRID, fit_curve

ANNEALING_SEEN_MIN = 0.5
"""Below this share of the final annealing area seen, a fit with C = 0 gets a caveat: most of the
LR decay is still to come and the law has not measured what it does."""
BURN_IN_SPREAD_MAX = 0.02
"""When refitting with the burn-in halved or raised by half moves the forecast final loss by more
than this share, the forecast gets a caveat: which early points are fitted decides the end, so
the points do not pin it. On the CPU benchmarks' cosine runs (docs/forecast.md) every fit on the
first 30% of a run moved its end by 54% or more this way (one landed 0.3% from the measured end,
by luck: halving its burn-in forecast -0.81, raising it 0.99); fits on 75% moved it 0.8-4.5%."""
BURN_IN_FACTORS = (0.5, 1.5)
"""The burn-ins tried, as multiples of the one used (:data:`BURN_IN_SPREAD_MAX`)."""
ANNEALING_GAIN_MAX = 0.02
"""A fit with C > 0 that has seen under :data:`ANNEALING_SEEN_MIN` of the annealing area, and
whose annealing still to come takes more than this share of the loss off by the end, gets a
caveat (``annealing_extrapolated``): the published warm-up-stable-decay runs forecast from the
first steps of their cooldown were 2-4% off, without a caveat before this one."""
HOLDOUT_SHARE = 2 / 3
"""The share of the fitted points (the earliest) refitted to measure the drift and the misfit."""
MISFIT_RATIO = 3.0
"""A fit whose first two thirds forecast the last third with an rms error above this many times
their own scatter about that refit gets a caveat (``misfit``)..."""
MISFIT_MIN = 0.002
"""... when that error is also above this share of the loss: on the published curves the scatter
is 0.01% of the loss, and a 0.05% miss is not a reason to distrust a forecast."""
NO_ANNEALING_LOW = 0.05
"""How far below the forecast the band's lower end opens for a fit that has seen no annealing
(C = 0, under :data:`ANNEALING_SEEN_MIN` of the annealing area): the cooldowns of the published
runs (docs/forecast.md) removed 2.4-4.0% of the loss the stable phase forecast, and nothing in
the fitted points bounds it."""
ALPHA_BOUNDS = (float(ALPHA_GRID[0]), float(ALPHA_GRID[-1]))
"""The exponents the fit may take (:data:`~.law.ALPHA_GRID`'s ends)."""


def annealing_share(areas, step_index: int) -> float:
    """Share of the schedule's final annealing area S2 reached after step ``step_index`` (1 when
    the schedule never decays): a fit whose last point is there extrapolates C by its inverse."""
    total = float(areas.s2[-1])
    return float(areas.s2[step_index]) / total if total > 0 else 1.0


def refit_final_loss(s1, s2, loss, end_s1: float, end_s2: float) -> Optional[float]:
    """The law refitted on these points, at the schedule's end (None when fewer than 5 points
    remain or the fit fails)."""
    if np.asarray(s1).size < 5:
        return None
    try:
        return float(fit_curve(s1, s2, loss).law(end_s1, end_s2))
    except FitError:
        return None


def burn_in_finals(refit_final: Callable[[float], Optional[float]], burn_in_warmups: float
                   ) -> list[float]:
    """The final losses forecast with the burn-in at :data:`BURN_IN_FACTORS` x
    ``burn_in_warmups`` (``refit_final(burn)``: None when too few points remain).

    The burn-in never ends before the warm-up does, so 0 (the paper's rule) fits from one warm-up
    on, and halving it changes nothing: it is raised instead (to 2 warm-ups), rather than report
    no spread, which read as "not sensitive".
    """
    base = max(float(burn_in_warmups), 1.0)
    burns = [f * base if f * base > 1.0 else 2.0 * base for f in BURN_IN_FACTORS]
    finals = [refit_final(burn) for burn in burns]
    return [f for f in finals if f is not None and math.isfinite(f)]


def burn_in_spread(final_loss: float, refit_final, burn_in_warmups: float) -> Optional[float]:
    """How much the forecast final loss depends on the burn-in: the largest relative change of
    ``final_loss`` among :func:`burn_in_finals` (None when no refit was possible).

    A degenerate fit (the law's L0, A and alpha traded against each other along a short stretch
    of curve) shows here first: its in-sample residuals barely change, its extrapolation does.
    """
    finals = burn_in_finals(refit_final, burn_in_warmups)
    return spread_of(final_loss, finals)


def spread_of(final_loss: float, finals: Sequence[float]) -> Optional[float]:
    """The largest relative distance of ``finals`` from ``final_loss`` (None: no finals)."""
    if not finals:
        return None
    return max(abs(f - final_loss) for f in finals) / max(abs(final_loss), 1e-12)


@dataclass(frozen=True)
class Holdout:
    """The law refitted on the first two thirds of the fitted points."""

    final_loss: float
    """Its forecast of the final loss."""
    error_rms: float
    """Its rms error on the last third of the fitted points."""
    scatter: float
    """The refit's residual scatter on its own points (rms, inflated for its 4 parameters)."""
    distance_ratio: float
    """Steps from the last fitted point to the end, over the steps the last third spans."""
    annealing_unseen: float = 0.0
    """:func:`annealing_unseen` of the law fitted on all the points (the same fit as the
    forecast's): carried here so that a caller passing the holdout to :func:`final_band` gets the
    term without computing it."""


def annealing_unseen(C: float, end_s2: float, last_s2: float) -> float:
    """The part of a forecast that is annealing extrapolated from what was seen: the loss the law
    takes off for the annealing after the last fitted point, ``C * (end_s2 - last_s2)``, times the
    share of the schedule's annealing area not yet seen, ``1 - last_s2 / end_s2`` (0 for a
    schedule that never decays, or C = 0, which :data:`NO_ANNEALING_LOW` covers)."""
    if not end_s2 > 0 or not C > 0:
        return 0.0
    to_come = max(float(end_s2) - float(last_s2), 0.0)
    return float(C) * to_come * min(to_come / float(end_s2), 1.0)


def holdout(s1: np.ndarray, s2: np.ndarray, loss: np.ndarray, steps: np.ndarray,
            end_step: int, end_s1: float, end_s2: float, fit=None) -> Optional[Holdout]:
    """:class:`Holdout` of a fit on points at areas ``s1``, ``s2`` after schedule steps ``steps``
    (in order), the end at ``end_step``; None with fewer than 5 points in the first two thirds or
    none after them, or when that refit fails. ``fit``: the law fitted on all the points (its C
    gives :attr:`Holdout.annealing_unseen`), refitted here when not given."""
    n = int(np.asarray(loss).size)
    m = int(math.ceil(HOLDOUT_SHARE * n))
    if m < 5 or m >= n:
        return None
    try:
        early = fit_curve(s1[:m], s2[:m], loss[:m])
        fit = fit if fit is not None else fit_curve(s1, s2, loss)
    except FitError:
        return None
    err = early.law(s1[m:], s2[m:]) - loss[m:]
    # The scatter of the points the refit did fit (a noise level the misfit of the last third
    # does not inflate, as the full fit's residuals would be).
    scatter = early.rms_residual * math.sqrt(m / max(m - 4, 1))
    span = max(int(steps[n - 1]) - int(steps[m - 1]), 1)
    return Holdout(final_loss=float(early.law(end_s1, end_s2)),
                   error_rms=float(np.sqrt(np.mean(np.square(err)))), scatter=scatter,
                   distance_ratio=max(int(end_step) - int(steps[n - 1]), 0) / span,
                   annealing_unseen=annealing_unseen(getattr(fit, "law", fit).C, end_s2,
                                                     float(s2[n - 1])))


def final_band(final_loss: float, low: float, high: float, burn_finals: Sequence[float] = (),
               held: Optional[Holdout] = None, no_annealing_seen: bool = False,
               unseen: Optional[float] = None) -> tuple[float, float]:
    """The bootstrap band ``[low, high]`` of the final loss widened by the law's own uncertainty
    (the module docstring): the burn-in refits, the drift, an annealing not yet seen and the
    annealing still to come (``unseen``, :func:`annealing_unseen`; None: ``held``'s)."""
    values = [low, high, *burn_finals]
    if held is not None:
        drift = abs(held.final_loss - final_loss) * math.sqrt(max(held.distance_ratio, 1.0))
        values += [final_loss - drift, final_loss + drift]
    if unseen is None:
        unseen = held.annealing_unseen if held is not None else 0.0
    values += [final_loss - unseen, final_loss + unseen]
    lo, hi = min(values), max(values)
    if no_annealing_seen:
        lo = min(lo, final_loss - NO_ANNEALING_LOW * abs(final_loss))
    return float(lo), float(hi)


def fit_caveats(fit, annealing_seen: float, final_loss: float, final_low: float,
                burn_in_spread: Optional[float] = None, held: Optional[Holdout] = None,
                annealing_to_come: float = 0.0) -> dict[str, str]:
    """Why a forecast may miss, read off its own fit: ``{key: explanation}``, empty when nothing
    stands out.

    Each is a state of the fit seen where forecasts went wrong, and one a user can act on (wait
    for more points, fit a second schedule with ``--also-fit``, or trust the band rather than its
    centre).

    Args:
        fit: the :class:`~.law.CurveFit` (or only its law: then the checks that need its points,
            A near 0, are skipped).
        annealing_seen: the share of the schedule's final S2 reached by the last fitted point.
        final_loss, final_low: the forecast end and its band's lower end.
        burn_in_spread: :func:`burn_in_spread` (None: not measured).
        held: :func:`holdout` (None: not measured).
        annealing_to_come: the schedule's annealing area after the last fitted point (S2 at the
            end minus S2 there), for the share of the forecast that is annealing not yet seen.
    """
    law = getattr(fit, "law", fit)
    out = {}
    if law.L0 <= 0.0:
        out["L0_at_bound"] = (
            "the law's asymptote L0 sits at its bound 0: the fitted points do not show the curve "
            "flattening yet (an early or still learning-limited stretch, or a transient past the "
            "burn-in), so the forecast extends a curve that has not bent")
    if law.C <= 0.0 and annealing_seen < ANNEALING_SEEN_MIN:
        out["no_annealing_seen"] = (
            f"the fitted points reach {100 * annealing_seen:.0f}% of the schedule's annealing area "
            "and show none of its effect (C = 0): the forecast leaves out the loss the LR decay "
            "will still remove and should land above the end")
    gain = law.C * annealing_to_come / max(abs(final_loss), 1e-12)
    if law.C > 0.0 and annealing_seen < ANNEALING_SEEN_MIN and gain > ANNEALING_GAIN_MAX:
        out["annealing_extrapolated"] = (
            f"the fitted points reach {100 * annealing_seen:.0f}% of the schedule's annealing area, "
            f"and {100 * gain:.1f}% of the loss the forecast takes off by the end is annealing "
            "still to come, its size C read off the first of it: the cooldown's gain is "
            "extrapolated, not measured")
    if not ALPHA_BOUNDS[0] * (1 + 1e-3) < law.alpha < ALPHA_BOUNDS[1] * (1 - 1e-3):
        out["alpha_at_bound"] = (
            f"the law's exponent alpha = {law.alpha:.3g} sits at the end of the range the fit "
            f"searches [{ALPHA_BOUNDS[0]:g}, {ALPHA_BOUNDS[1]:g}]: the points ask for a curve the "
            "law does not take (a transient, a change of data or schedule), so its extrapolation "
            "is not the run's")
    if hasattr(fit, "s1_range"):
        lo, hi = fit.s1_range
        fall = law.A * (lo ** -law.alpha - hi ** -law.alpha) if lo > 0 else 0.0
        if not fall > fit.rms_residual:
            out["A_near_zero"] = (
                f"the law's forward term A*S1^-alpha (A = {law.A:.3g}) explains less of the "
                f"fitted points' fall ({fall:.2g}) than their scatter ({fit.rms_residual:.2g}): the "
                "curve is read as flat plus annealing, which says nothing of how it goes on")
    if min(final_loss, final_low) <= 0.0:
        out["band_below_zero"] = ("the forecast of the final loss or its band reaches below 0: "
                                  "the fitted points leave the law's extrapolation unpinned")
    if burn_in_spread is not None and burn_in_spread > BURN_IN_SPREAD_MAX:
        out["burn_in_sensitive"] = (
            f"refitted with the burn-in halved or raised by half, the forecast final loss moves "
            f"by {100 * burn_in_spread:.1f}%: which early points are fitted decides the end, so "
            "the points do not pin it (wait for more of the run, or fit a second run with "
            "--also-fit)")
    # Only where the end is farther from the last point than the stretch the refit missed: a
    # forecast of the next few steps does not extrapolate the misfit (a real tiny run's last
    # checks, 0.2% from its end, missed their last third by 4x the scatter).
    if held is not None and held.error_rms > MISFIT_RATIO * held.scatter \
            and held.error_rms > MISFIT_MIN * abs(final_loss) and held.distance_ratio >= 1.0:
        out["misfit"] = (
            f"the law fitted on the first two thirds of the points misses the last third by "
            f"{held.error_rms:.3g} (rms), {held.error_rms / max(held.scatter, 1e-12):.1f}x their "
            "scatter: the law does not describe this stretch of the run, so its extrapolation "
            "is not to be trusted")
    return out
