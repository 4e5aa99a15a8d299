"""This module owns the live check of a run against its own loss-curve forecast.

At every evaluation (``logging.forecast``, on by default) the curve law of
:mod:`megatron_tinyllama.scaling.forecast.law` is refitted on the validation losses measured *before*
this one, over the run's whole planned schedule (earlier stages included, through
``checkpoint.continue_from``), and the new loss is checked against the law's bootstrap band at
this step, widened by ``logging.forecast_tolerance`` on each side. The forecast final loss, its
band and the live loss's distance from the band go to ``metrics.jsonl`` and TensorBoard; a loss
that leaves the band (a spike, a data bug, a bad restart) logs one WARNING line with the step,
the loss and the band, once per excursion.

Fitting on the points before the new one is what lets a fault show: a refit that included it
would bend towards it. The fit is capped at :data:`MAX_FIT_POINTS` points and the band at
:data:`REPLICATES` resamples, about 0.1 s per evaluation on one core whatever the run's length.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_tinyllama.scaling.errors import ScalingError
from megatron_tinyllama.scaling.forecast.history import (
    Points,
    Schedule,
    build_schedule,
    load_history,
    segment_of,
)
from megatron_tinyllama.scaling.forecast.law import (
    DEFAULT_DECAY,
    bootstrap_band,
    fit_curve,
    lr_areas,
)
from megatron_tinyllama.scaling.forecast.predict import BURN_IN_WARMUPS, fit_points
from megatron_tinyllama.scaling.forecast.trust import (
    ANNEALING_SEEN_MIN,
    annealing_share,
    annealing_unseen,
    burn_in_finals,
    final_band,
    fit_caveats,
    holdout,
    refit_final_loss,
    spread_of,
)

logger = logging.getLogger(__name__)

MAX_FIT_POINTS = 120
REPLICATES = 40
CONFIDENCE = 0.95


@dataclass(frozen=True)
class LiveCheck:
    """The forecast at one evaluation, and where the measured loss fell."""

    step: int
    loss: float
    expected: float
    low: float
    high: float
    """The band at this step, widened by the tolerance."""
    final_loss: float
    final_low: float
    final_high: float
    distance: float
    """0 inside the band; else loss - high (above) or loss - low (below, negative)."""
    warned: bool
    caveats: tuple[str, ...] = ()
    """Keys of :func:`~megatron_tinyllama.scaling.forecast.trust.fit_caveats`: why the forecast final
    loss is not to be trusted yet (the log line and ``forecast_caveats`` say so)."""

    def record(self) -> dict:
        """The fields added to the evaluation's metrics record."""
        out = {"forecast_final_loss": self.final_loss, "forecast_final_low": self.final_low,
               "forecast_final_high": self.final_high, "forecast_expected_loss": self.expected,
               "forecast_band_low": self.low, "forecast_band_high": self.high,
               "forecast_band_distance": self.distance}
        if self.caveats:
            out["forecast_caveats"] = ",".join(self.caveats)
        return out


class LiveForecast:
    """Checks each new validation loss against the forecast made from the ones before it.

    Args:
        schedule: every step of the run as planned (earlier stages included).
        points: validation losses already measured (earlier stages, or before a resume).
        min_points: measured points past warm-up needed before the first check.
        tolerance: relative margin added to each side of the band before a loss is outside.
        decay: lambda of the annealing area.
        batch_exponent: how a step of another batch counts (``lr_areas``).
        burn_in_warmups: points before this many warm-ups are not fitted (see
            :data:`~megatron_tinyllama.scaling.forecast.predict.BURN_IN_WARMUPS`).
    """

    def __init__(self, schedule: Schedule, points: Optional[Points] = None, *, min_points: int = 8,
                 tolerance: float = 0.02, decay: float = DEFAULT_DECAY,
                 batch_exponent: float = 1.0,
                 burn_in_warmups: float = BURN_IN_WARMUPS) -> None:
        self.schedule = schedule
        self.points = points if points is not None else Points()
        self.min_points = min_points
        self.tolerance = tolerance
        self.decay = decay
        self.batch_exponent = batch_exponent
        self.burn_in_warmups = burn_in_warmups
        self.disabled = False
        self._outside = False
        # The areas of the whole planned schedule, once: a loop over every step (1M for v1.1).
        self.areas = lr_areas(schedule.lr, schedule.step_tokens, schedule.reference_tokens, decay,
                              batch_exponent)

    @classmethod
    def for_run(cls, cfg, start_tokens: int) -> "LiveForecast":
        """The monitor of a run starting (or resuming) at ``start_tokens``: its history is read
        from ``checkpoint.save_dir`` (config.yaml, metrics.jsonl) and the stages it continues."""
        opts = dict(min_points=cfg.logging.forecast_min_points,
                    tolerance=cfg.logging.forecast_tolerance,
                    batch_exponent=cfg.logging.forecast_batch_exponent)
        save_dir = cfg.checkpoint.save_dir
        if save_dir and (Path(save_dir) / "config.yaml").is_file():
            try:
                history = load_history(save_dir, start_tokens=start_tokens)
                for note in history.notes:
                    logger.info("forecast: %s", note)
                # The steps trained so far at the LRs the trainer logged, not rebuilt from this
                # recipe (a resume with a larger train.train_tokens stretches its schedule).
                return cls(history.schedule(), history.valid.until_tokens(start_tokens), **opts)
            except Exception as err:  # noqa: BLE001 - a forecast must never stop a training run
                logger.warning("forecast: earlier records not used (%s); forecasting this stage "
                               "from its own evaluations", err)
        return cls(build_schedule([segment_of(cfg, start_tokens)]), **opts)

    def observe(self, step: int, tokens: int, loss: float) -> Optional[LiveCheck]:
        """Check ``loss`` (validation, after ``tokens``) against the forecast, then keep it.

        Returns None while there are too few points, or when the fit fails (not an error of
        the run: the law may simply not describe its first steps yet).
        """
        check = None
        if math.isfinite(loss) and not self.disabled:
            try:
                check = self._check(step, tokens, loss)
            except ScalingError as err:
                logger.debug("forecast skipped at step %d: %s", step, err)
            except Exception as err:  # noqa: BLE001 - a forecast must never stop a training run
                self.disabled = True
                logger.warning("forecast disabled for this run after an error at step %d: %r",
                               step, err)
            self.points.add(int(tokens), int(step), float(loss))
        return check

    def _check(self, step: int, tokens: int, loss: float) -> Optional[LiveCheck]:
        if tokens > self.schedule.tokens[-1]:
            return None
        areas, idx, y = fit_points(self.schedule, self.points, self.decay,
                                   max_points=MAX_FIT_POINTS, areas=self.areas,
                                   burn_in_warmups=self.burn_in_warmups)
        if idx.size < self.min_points:
            return None
        s1, s2 = areas.s1[idx], areas.s2[idx]
        fit = fit_curve(s1, s2, y)
        here = int(self.schedule.index_of([tokens])[0])
        last = self.schedule.tokens.size - 1
        band = bootstrap_band(s1, s2, y, areas.s1[[here, last]], areas.s2[[here, last]], fit=fit,
                              replicates=REPLICATES, confidence=CONFIDENCE, seed=step)
        expected = float(band.estimate[0])
        low = float(band.low[0]) - self.tolerance * abs(expected)
        high = float(band.high[0]) + self.tolerance * abs(expected)
        distance = loss - high if loss > high else loss - low if loss < low else 0.0
        warned = distance != 0.0 and not self._outside
        self._outside = distance != 0.0
        if warned:
            logger.warning(
                "step %d: validation loss %.4f left the forecast band [%.4f, %.4f] (expected "
                "%.4f from the %d evaluations before it): a loss spike, a data problem or a bad "
                "restart? Forecast final loss was %.4f [%.4f, %.4f]", step, loss, low, high,
                expected, idx.size, band.estimate[1], band.low[1], band.high[1])
        # The final band adds the law's own uncertainty to the bootstrap's (forecast/trust.py);
        # the band at this step, which raises the alarm, stays the bootstrap's.
        final = float(band.estimate[1])
        finals = burn_in_finals(self._refit_final, self.burn_in_warmups)
        held = holdout(s1, s2, y, idx, last, areas.s1[-1], areas.s2[-1], fit=fit)
        seen = annealing_share(areas, int(idx[-1]))
        # The annealing still to come, from this fit (also when the holdout cannot be made).
        unseen = annealing_unseen(fit.law.C, float(areas.s2[-1]), float(areas.s2[int(idx[-1])]))
        final_low, final_high = final_band(final, float(band.low[1]), float(band.high[1]),
                                           finals, held,
                                           fit.law.C <= 0 and seen < ANNEALING_SEEN_MIN, unseen)
        caveats = tuple(fit_caveats(fit, seen, final, final_low, spread_of(final, finals), held,
                                    float(areas.s2[-1] - areas.s2[int(idx[-1])])))
        return LiveCheck(step=step, loss=loss, expected=expected, low=low, high=high,
                         final_loss=final, final_low=final_low, final_high=final_high,
                         distance=float(distance), warned=warned, caveats=caveats)

    def _refit_final(self, burn_in_warmups: float) -> Optional[float]:
        """The final loss forecast from the same points with another burn-in (None: < 5 left)."""
        areas, idx, y = fit_points(self.schedule, self.points, self.decay,
                                   max_points=MAX_FIT_POINTS, areas=self.areas,
                                   burn_in_warmups=burn_in_warmups)
        return refit_final_loss(areas.s1[idx], areas.s2[idx], y, areas.s1[-1], areas.s2[-1])


@dataclass(frozen=True)
class LiveSummary:
    """How a run's live forecasts of its final loss fared against the end it reached."""

    checks: int
    first_step: int
    measured_end: float
    measured_end_step: int
    inside: int
    """Checks whose 95% final band held the measured end."""
    caveated: int
    warnings: int
    """Excursions of a validation loss out of the band at its step (one WARNING line each)."""
    first_error: float
    last_error: float
    """Relative error (forecast / measured - 1) of the first and the last check."""


def summarize_live_checks(metrics_path) -> Optional[LiveSummary]:
    """The live checks a run's ``metrics.jsonl`` holds (its ``forecast_*`` fields) against the
    last validation loss; None when there are none."""
    from megatron_tinyllama.scaling.run_metrics import is_number, iter_records

    checks, end = [], None
    for _, record in iter_records(metrics_path):
        if not isinstance(record, dict) or not is_number(record.get("valid_loss")):
            continue
        end = (int(record["step"]), float(record["valid_loss"]))
        if is_number(record.get("forecast_final_loss")):
            checks.append(record)
    if not checks or end is None:
        return None
    step, loss = end
    inside = sum(1 for r in checks if r["forecast_final_low"] <= loss <= r["forecast_final_high"])
    warnings, was_out = 0, False
    for record in checks:  # one warning per excursion, as the check logs them
        out = record.get("forecast_band_distance", 0.0) != 0.0
        warnings += out and not was_out
        was_out = out
    return LiveSummary(checks=len(checks), first_step=int(checks[0]["step"]), measured_end=loss,
                       measured_end_step=step, inside=inside,
                       caveated=sum(1 for r in checks if r.get("forecast_caveats")), warnings=warnings,
                       first_error=checks[0]["forecast_final_loss"] / loss - 1,
                       last_error=checks[-1]["forecast_final_loss"] / loss - 1)
