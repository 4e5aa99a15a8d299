"""This module owns the loss-curve forecast of a run: which of its points are fitted (past the
warm-up and a burn-in), the fit of the curve law (:mod:`.law`), the forecast over the run's
planned steps with its band and caveats (:mod:`.trust`), and the checks of a forecast against
what was measured later (``--plan``, a bigger run from small ones, is :mod:`.plan`; reading the
run is :mod:`.history`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from megatron_tinyllama.scaling.errors import FitError
from megatron_tinyllama.scaling.forecast.history import (
    Points,
    RunHistory,
    Schedule,
    build_schedule,
    load_history,
    load_recipes,
    segment_of,
    with_logged_lr,
)
from megatron_tinyllama.scaling.forecast.law import (
    DEFAULT_DECAY,
    Areas,
    CurveBand,
    CurveFit,
    bootstrap_band,
    fit_curve,
    lr_areas,
)
from megatron_tinyllama.scaling.forecast.trust import (
    ANNEALING_SEEN_MIN,
    Holdout,
    annealing_share,
    annealing_unseen,
    burn_in_finals,
    final_band,
    fit_caveats,
    holdout,
    refit_final_loss,
    spread_of,
)

BURN_IN_WARMUPS = 5.0
"""Points before step ``BURN_IN_WARMUPS x warm-up steps`` are not fitted: a small model's first
steps after the warm-up go through plateaus and bumps the law does not describe (the CPU
benchmark's tiny Llamas: a plateau and two bumps up to ~4-5 warm-ups, 4 steps each). Tied to the
schedule, known before training, so it does not grow with what has been measured: a rule of
"half the measured tokens" left 5 points, all inside that transient, to a fit on the first 30%
of a 64-step run. For a TinyLlama-sized run (2,000 warm-up steps) it is 10,000 steps."""
MAX_CURVE_POINTS = 400
"""Points of the forecast curve written to JSON and plotted (a 1M-step run is subsampled)."""


# ---------------------------------------------------------------------------------------------
# Fit and forecast.


@dataclass(frozen=True)
class Forecast:
    """A fitted curve law and its forecast over a run's planned steps."""

    fit: CurveFit
    schedule: Schedule
    decay: float
    loss_kind: str
    fitted_tokens: np.ndarray
    fitted_loss: np.ndarray
    measured_tokens: np.ndarray
    """Every measured point (fitted or not), for plots and checks."""
    measured_steps: np.ndarray
    measured_loss: np.ndarray
    curve_index: np.ndarray
    """Schedule step indices of the forecast curve (subsampled, the last step included)."""
    band: CurveBand
    areas: Areas
    """S1, S2 after every step of ``schedule``."""
    also_fit: tuple[tuple[str, int], ...] = ()
    """(folder, points) of the other runs fitted with this one (``also_fit``)."""
    burn_in_spread: Optional[float] = None
    """:func:`burn_in_spread` of the forecast final loss (None: no refit was possible)."""
    holdout: Optional[Holdout] = None
    """The law refitted on the first two thirds of this run's fitted points (:func:`holdout`)."""
    notes: tuple[str, ...] = ()
    """How the run was read where that is not the plain reading (LRs from the log, another
    validation set, the training loss fitted), one line each."""
    warnings: tuple[str, ...] = ()
    """Measured points left out (non-finite losses, naming their metrics.jsonl lines)."""

    def predict(self, tokens: Sequence[float]) -> np.ndarray:
        """The law's loss after the steps ending at ``tokens``."""
        idx = self.schedule.index_of(tokens)
        return self.fit.law(self.areas.s1[idx], self.areas.s2[idx])

    @property
    def final_loss(self) -> float:
        return float(self.band.estimate[-1])

    @property
    def annealing_seen(self) -> float:
        """:func:`annealing_share` at the last fitted point."""
        last = int(self.schedule.index_of([self.fitted_tokens.max()])[0])
        return annealing_share(self.areas, last)

    def caveats_by_key(self) -> dict[str, str]:
        """Why this forecast may miss, read off its own fit (:func:`fit_caveats`)."""
        last = int(self.schedule.index_of([self.fitted_tokens.max()])[0])
        return fit_caveats(self.fit, self.annealing_seen, self.final_loss,
                           float(self.band.low[-1]), self.burn_in_spread, self.holdout,
                           float(self.areas.s2[-1] - self.areas.s2[last]))

    def caveats(self) -> list[str]:
        """The explanations of :meth:`caveats_by_key`."""
        return list(self.caveats_by_key().values())

    def to_json(self) -> dict:
        """``{"final_loss", "band", "curve", "params", ...}`` (the CLI's ``--out``)."""
        s, idx = self.schedule, self.curve_index
        curve = [{"step": int(i) + 1, "tokens": int(s.tokens[i]), "loss": float(e),
                  "low": float(lo), "high": float(hi)}
                 for i, e, lo, hi in zip(idx, self.band.estimate, self.band.low, self.band.high)]
        law = self.fit.law
        first_step = {int(s.segment[i]): i for i in range(s.tokens.size - 1, -1, -1)}
        return {
            "final_loss": self.final_loss,
            "band": [float(self.band.low[-1]), float(self.band.high[-1])],
            "confidence": self.band.confidence,
            "curve": curve,
            "params": {"L0": law.L0, "A": law.A, "alpha": law.alpha, "C": law.C,
                       "decay": self.decay, "reference_tokens": s.reference_tokens},
            "fit": {"points": self.fit.num_points, "loss": self.loss_kind,
                    "rms_residual": self.fit.rms_residual,
                    "from_tokens": int(self.fitted_tokens.min()),
                    "until_tokens": int(self.fitted_tokens.max()),
                    "annealing_area_seen": self.annealing_seen,
                    "burn_in_spread": self.burn_in_spread,
                    "also_fit": [{"run": run, "points": n} for run, n in self.also_fit],
                    "bootstrap_replicates": self.band.replicates},
            "caveats": self.caveats(),
            "caveat_keys": list(self.caveats_by_key()),
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "stages": [{"name": seg.name, "first_step": first_step[k] + 1,
                        "start_tokens": seg.start_tokens, "end_tokens": seg.end_tokens,
                        "batch_tokens": seg.batch_tokens}
                       for k, seg in enumerate(s.segments)],
        }


def widen_band(band: CurveBand, steps: np.ndarray, last_fitted: int,
               final: tuple[float, float]) -> CurveBand:
    """``band`` (at schedule steps ``steps``) with its end set to ``final`` (:func:`final_band`):
    the widening grows linearly from the last fitted step to the end, none before it."""
    steps = np.asarray(steps, dtype=float)
    share = np.clip((steps - last_fitted) / max(steps[-1] - last_fitted, 1.0), 0.0, 1.0)
    low = band.low - share * max(band.low[-1] - final[0], 0.0)
    high = band.high + share * max(final[1] - band.high[-1], 0.0)
    return replace(band, low=low, high=high)


def curve_indices(schedule: Schedule, measured_tokens: Sequence[float] = (),
                  max_points: int = MAX_CURVE_POINTS) -> np.ndarray:
    """Steps to report: evenly spaced, every stage boundary, the measured points, the last."""
    n = schedule.tokens.size
    idx = set(np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int)).tolist())
    idx |= set(np.flatnonzero(np.diff(schedule.segment)).tolist())
    idx |= set(schedule.index_of(measured_tokens).tolist()) if len(measured_tokens) else set()
    idx.add(n - 1)
    return np.asarray(sorted(idx))


def check_burn_in(burn_in_warmups: float, name: str = "burn_in_warmups") -> float:
    """``burn_in_warmups`` when it is a finite number >= 0.

    Raises:
        FitError: naming ``name`` (the CLI passes its flag) and the value: infinity overflowed
            the step count, a negative one fitted points inside the warm-up.
    """
    if isinstance(burn_in_warmups, bool) or not isinstance(burn_in_warmups, (int, float)) \
            or not math.isfinite(burn_in_warmups) or burn_in_warmups < 0:
        raise FitError(f"{name} must be a finite number of warm-ups >= 0 (0: fit from the end of "
                       f"the warm-up), got {burn_in_warmups!r}")
    return float(burn_in_warmups)


def burn_in_steps(areas: Areas, burn_in_warmups: float = BURN_IN_WARMUPS) -> int:
    """The first step (1-based) fitted: past the warm-up and ``burn_in_warmups`` warm-ups."""
    return max(areas.warmup_steps + 1, math.ceil(burn_in_warmups * areas.warmup_steps))


def fit_points(schedule: Schedule, points: Points, decay: float = DEFAULT_DECAY,
               *, max_points: Optional[int] = None, areas: Optional[Areas] = None,
               burn_in_warmups: float = BURN_IN_WARMUPS):
    """(areas, step indices, losses) of the points from :func:`burn_in_steps` on, at most
    ``max_points`` of them (evenly thinned, the latest kept) so a live refit costs the same at
    step 1M as at step 1k. ``areas`` of the schedule may be given when already computed (a loop
    over every step)."""
    if areas is None:
        areas = lr_areas(schedule.lr, schedule.step_tokens, schedule.reference_tokens, decay)
    idx = schedule.index_of(points.tokens)
    y = np.asarray(points.loss, dtype=float)
    tokens = np.asarray(points.tokens, dtype=float)
    keep = (idx + 1 >= burn_in_steps(areas, burn_in_warmups)) & (tokens <= schedule.tokens[-1])
    idx, y = idx[keep], y[keep]
    if max_points is not None and idx.size > max_points:
        pick = np.unique(np.linspace(0, idx.size - 1, max_points).round().astype(int))
        idx, y = idx[pick], y[pick]
    return areas, idx, y


def forecast_history(
    history: RunHistory,
    next_stages: Sequence[object] = (),
    *,
    also_fit: Sequence[RunHistory] = (),
    fit_until_step: Optional[int] = None,
    decay: float = DEFAULT_DECAY,
    batch_exponent: float = 1.0,
    burn_in_warmups: float = BURN_IN_WARMUPS,
    replicates: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> Forecast:
    """Fit the curve law on a run's points and forecast the rest of it and of ``next_stages``.

    Args:
        history: the run (:func:`load_history`).
        next_stages: JobConfigs of the stages that follow, in order; each starts where the one
            before it ends.
        also_fit: other runs whose points are fitted together with this run's, each over its
            own schedule (areas in this run's reference steps): a second schedule pins the split
            between the forward and the annealing terms that one curve leaves loose (an earlier
            cosine run for the cooldown of a run still in its stable phase).
        fit_until_step: fit only the records up to this step (to check a forecast against what
            came after).
        decay: lambda of the annealing area.
        batch_exponent: how a step of another batch counts (:func:`~.curve.lr_areas`; 1 per
            token, 0.5 Adam's square-root rule).
        burn_in_warmups: points before this many warm-ups (in steps) are not fitted
            (:data:`BURN_IN_WARMUPS`; 0 fits from the end of the warm-up, the paper's rule).
        replicates, confidence, seed: the bootstrap band.

    Raises:
        FitError: fewer than 5 points past warm-up and burn-in, or a failed fit.
    """
    check_burn_in(burn_in_warmups)
    segments = list(history.segments)
    for cfg in next_stages:
        segments.append(segment_of(cfg, segments[-1].end_tokens))
    planned = build_schedule(segments)
    notes = list(history.notes)
    schedule = planned
    if len(history.lr):
        lr, used, differ = with_logged_lr(planned.tokens, planned.lr, history.lr, history.breaks)
        schedule = replace(planned, lr=lr)
        if differ:
            notes.append(
                f"the LR of the steps trained so far is the one metrics.jsonl logged ({used} "
                f"logged steps): the recipe now gives another LR at {differ} of them (a resume "
                "with another schedule or train.train_tokens); the recipe's LR is used from step "
                f"{int(schedule.index_of([history.lr.tokens[-1]])[0]) + 2} on")
    areas = lr_areas(schedule.lr, schedule.step_tokens, schedule.reference_tokens, decay,
                     batch_exponent)

    def until_step(points: Points) -> Points:
        if fit_until_step is None:
            return points
        keep = [i for i, s in enumerate(points.steps) if s <= fit_until_step]
        return Points([points.tokens[i] for i in keep], [points.steps[i] for i in keep],
                      [points.loss[i] for i in keep])

    points, kind = history.points()
    fitted = until_step(points)
    areas, idx, y = fit_points(schedule, fitted, decay, areas=areas,
                               burn_in_warmups=burn_in_warmups)
    if idx.size < 5 and kind == "valid_loss":
        # Few evaluations (the demo evaluates every 112 steps): the training loss, logged every
        # few steps, still draws the curve; noisier, and a little below the validation loss.
        t_fitted = until_step(history.train)
        _, t_idx, t_y = fit_points(schedule, t_fitted, decay, areas=areas,
                                   burn_in_warmups=burn_in_warmups)
        if t_idx.size >= 5:
            notes.append(
                f"only {idx.size} validation point(s) past the burn-in (the law needs 5): "
                f"fitting the {t_idx.size} training-loss points instead (noisier, on the batches "
                "trained on; evaluate more often, logging.eval_interval_steps, for a validation "
                "forecast)")
            points, kind, fitted, idx, y = history.train, "train_loss", t_fitted, t_idx, t_y
    warnings = tuple(history.non_finite.get(kind, ()))
    if idx.size < 5:
        until = f" up to step {fit_until_step}" if fit_until_step is not None else ""
        raise FitError(f"{history.run_dir}: {idx.size} {kind} record(s) past warm-up and its "
                       f"burn-in (from step {burn_in_steps(areas, burn_in_warmups)}){until}; the "
                       "curve law needs at least 5 (evaluate more often: "
                       "logging.eval_interval_steps, or fit from earlier: --burn-in-warmups)"
                       + "".join(f"; {note}" for note in (*history.notes, *warnings)))
    other_schedules = [other.schedule() for other in also_fit]
    other_areas = [lr_areas(o.lr, o.step_tokens, schedule.reference_tokens, decay, batch_exponent)
                   for o in other_schedules]

    def gather(burn: float):
        """This run's points from the burn-in ``burn`` on, then each ``also_fit`` run's."""
        _, own, own_y = fit_points(schedule, fitted, decay, areas=areas, burn_in_warmups=burn)
        s1, s2, loss, counts = [areas.s1[own]], [areas.s2[own]], [own_y], []
        for other, o_schedule, o_areas in zip(also_fit, other_schedules, other_areas):
            _, o_idx, o_y = fit_points(o_schedule, other.points()[0], decay, areas=o_areas,
                                       burn_in_warmups=burn)
            s1.append(o_areas.s1[o_idx])
            s2.append(o_areas.s2[o_idx])
            loss.append(o_y)
            counts.append((str(other.run_dir), int(o_idx.size)))
        return (*(np.concatenate(v) for v in (s1, s2, loss)), own.size, counts)

    s1, s2, loss, _, others = gather(burn_in_warmups)
    fit = fit_curve(s1, s2, loss)

    def refit_final(burn: float) -> Optional[float]:
        b1, b2, b_loss, own, _ = gather(burn)
        # This run's own points must hold 5, as for the main fit (the others only add to them).
        return refit_final_loss(b1, b2, b_loss, areas.s1[-1], areas.s2[-1]) if own >= 5 else None

    cidx = curve_indices(schedule, points.tokens)
    band = bootstrap_band(s1, s2, loss, areas.s1[cidx], areas.s2[cidx],
                          fit=fit, replicates=replicates, confidence=confidence, seed=seed)
    final = float(band.estimate[-1])
    finals = burn_in_finals(refit_final, burn_in_warmups)
    end = schedule.tokens.size - 1
    n_own = idx.size  # this run's points come first in s1, s2, loss
    held = holdout(s1[:n_own], s2[:n_own], loss[:n_own], idx, end, areas.s1[-1], areas.s2[-1],
                   fit=fit)
    no_annealing = fit.law.C <= 0 and annealing_share(areas, int(idx[-1])) < ANNEALING_SEEN_MIN
    unseen = annealing_unseen(fit.law.C, float(areas.s2[-1]), float(areas.s2[int(idx[-1])]))
    band = widen_band(band, cidx, int(idx[-1]),
                      final_band(final, float(band.low[-1]), float(band.high[-1]), finals, held,
                                 no_annealing, unseen))
    return Forecast(fit=fit, schedule=schedule, decay=decay, loss_kind=kind,
                    fitted_tokens=schedule.tokens[idx], fitted_loss=y,
                    measured_tokens=np.asarray(points.tokens, dtype=float),
                    measured_steps=np.asarray(points.steps), measured_loss=np.asarray(points.loss),
                    curve_index=cidx, band=band, areas=areas, also_fit=tuple(others),
                    burn_in_spread=spread_of(final, finals), holdout=held, notes=tuple(notes),
                    warnings=warnings)


def forecast_run(run_dir: Union[str, Path], recipes: Sequence[Union[str, Path]] = (),
                 also_fit: Sequence[Union[str, Path]] = (), **kwargs) -> Forecast:
    """:func:`forecast_history` of a run folder, with next stages given as recipe files and the
    runs fitted with it as folders."""
    return forecast_history(load_history(run_dir), load_recipes(recipes),
                            also_fit=[load_history(other) for other in also_fit], **kwargs)


def relative_errors(forecast: Forecast, tokens: Sequence[float], loss: Sequence[float],
                    after_tokens: float = -math.inf) -> dict:
    """Mean, max and last relative error of the forecast at measured points past ``after_tokens``."""
    tokens, loss = np.asarray(tokens, dtype=float), np.asarray(loss, dtype=float)
    keep = tokens > after_tokens
    if not keep.any():
        raise FitError("forecast check: no measured point after the fitted ones")
    err = np.abs(forecast.predict(tokens[keep]) - loss[keep]) / loss[keep]
    return {"points": int(keep.sum()), "mean": float(err.mean()), "max": float(err.max()),
            "last": float(err[-1])}


def predict_schedule(fit: CurveFit, fitted: tuple[np.ndarray, np.ndarray, np.ndarray],
                     schedule: Schedule, tokens: Sequence[float], *, reference_tokens: float,
                     decay: float = DEFAULT_DECAY, batch_exponent: float = 1.0,
                     replicates: int = 200, confidence: float = 0.95, seed: int = 0) -> CurveBand:
    """A law fitted on one run, applied to another schedule (the paper's cross-schedule check).

    Args:
        fit: the law and its residuals.
        fitted: ``(s1, s2, loss)`` it was fitted on (for the bootstrap band).
        schedule: the other run's steps.
        tokens: where to predict (token counts of that run's steps).
        reference_tokens: the fitted run's areas unit (its first batch), so both runs' areas
            are per token in the same unit.
    """
    areas = lr_areas(schedule.lr, schedule.step_tokens, reference_tokens, decay, batch_exponent)
    idx = schedule.index_of(tokens)
    s1, s2, y = fitted
    return bootstrap_band(s1, s2, y, areas.s1[idx], areas.s2[idx], fit=fit,
                          replicates=replicates, confidence=confidence, seed=seed)


def hindsight_check(run_dir: Union[str, Path], share: float = 0.7, **kwargs) -> dict:
    """How well a finished run's end was forecast from its first ``share`` of steps: the
    forecast (fitted on the records up to that step), the measured end and the relative error.

    A run with few evaluations is fitted on its training loss (:func:`forecast_history` says so
    in ``notes``) and checked against its last training loss.

    Returns:
        ``{"fit_until_step", "loss_kind", "final_loss", "band", "measured_end", "error",
        "caveat_keys", "notes"}``.

    Raises:
        RunFileError, FitError: the run cannot be read or too few points to fit.
    """
    if not 0 < share < 1:
        raise FitError(f"hindsight check: share must be in (0, 1), got {share}")
    history = load_history(run_dir)
    total = build_schedule(history.segments).tokens.size
    until = max(int(share * total), 1)
    fc = forecast_history(history, fit_until_step=until, **kwargs)
    end = float(fc.measured_loss[-1])
    return {"fit_until_step": until, "loss_kind": fc.loss_kind, "final_loss": fc.final_loss,
            "band": [float(fc.band.low[-1]), float(fc.band.high[-1])], "measured_end": end,
            "measured_end_step": int(fc.measured_steps[-1]),
            "error": (fc.final_loss - end) / end, "caveat_keys": list(fc.caveats_by_key()),
            "notes": list(fc.notes)}
