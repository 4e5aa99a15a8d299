"""This module owns ``tinyllama-scaling forecast --plan``: the loss curve of a planned (bigger) run
before it is trained, from small finished runs of the same data and tokenizer. L(C, M) of
:mod:`megatron_tinyllama.scaling.fit` (the over-training tool) gives the planned run's final loss
at its N and D; the curve law of :mod:`.law` fitted on the largest small run gives the curve's
shape over the planned schedule, shifted to end at that loss (the over-training paper's workflow,
with the whole curve).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from megatron_tinyllama.scaling.errors import FitError
from megatron_tinyllama.scaling.forecast.history import (
    Schedule,
    build_schedule,
    load_history,
    load_recipes,
    segment_of,
)
from megatron_tinyllama.scaling.forecast.law import DEFAULT_DECAY, CurveBand, lr_areas
from megatron_tinyllama.scaling.forecast.predict import Forecast, curve_indices, forecast_history


@dataclass(frozen=True)
class PlanForecast:
    """The curve of a planned run from small runs: the shape of the curve law fitted on the
    largest small run, shifted so its end is the L(C, M) prediction at the target's size."""

    law_fit: object
    """The :class:`~megatron_tinyllama.scaling.protocol.LawFit` of L(C, M) on the small runs."""
    shape_run: str
    curve: Forecast
    """The shape run's law on the target's schedule (before the shift)."""
    params: int
    tokens: int
    final_loss: float
    """L(C, M) at the target's N and D."""
    band: tuple[float, float]
    """Bootstrap interval of L(C, M) at the target."""
    shift: float
    schedule: Schedule
    reference_tokens: float
    """The areas' unit: the shape run's first batch."""

    def to_json(self) -> dict:
        c = self.curve
        s, idx = self.schedule, c.curve_index
        lo_off, hi_off = self.band[0] - self.final_loss, self.band[1] - self.final_loss
        est = c.band.estimate + self.shift
        g = self.law_fit.loss_fit.law
        first_step = {int(s.segment[i]): i for i in range(s.tokens.size - 1, -1, -1)}
        return {
            "final_loss": self.final_loss,
            "band": list(self.band),
            "confidence": c.band.confidence,
            "stages": [{"name": seg.name, "first_step": first_step[k] + 1,
                        "start_tokens": seg.start_tokens, "end_tokens": seg.end_tokens,
                        "batch_tokens": seg.batch_tokens} for k, seg in enumerate(s.segments)],
            "curve": [{"step": int(i) + 1, "tokens": int(s.tokens[i]), "loss": float(e),
                       "low": float(e + lo_off), "high": float(e + hi_off)}
                      for i, e in zip(idx, est)],
            "params": {"L0": c.fit.law.L0 + self.shift, "A": c.fit.law.A,
                       "alpha": c.fit.law.alpha, "C": c.fit.law.C, "decay": c.decay,
                       "reference_tokens": self.reference_tokens,
                       "loss_law": {"E": g.E, "a": g.a, "b": g.b, "eta": g.eta}},
            "plan": {"target_params": self.params, "target_tokens": self.tokens,
                     "shape_run": self.shape_run, "shift": self.shift,
                     "runs": [p.name for p in self.law_fit.loss_points]},
        }


def forecast_plan(run_dirs: Sequence[Union[str, Path]], recipes: Sequence[Union[str, Path]], *,
                  decay: float = DEFAULT_DECAY, replicates: int = 200, confidence: float = 0.95,
                  seed: int = 0) -> PlanForecast:
    """Forecast the curve of a planned run (``recipes``: its stages) from small finished runs.

    L(C, M) (:func:`~megatron_tinyllama.scaling.fit.fit_loss_law`, needs 5 runs and two token
    multipliers) fitted on the runs' final validation losses gives the planned run's final loss;
    the curve law fitted on the largest run gives the curve's shape, evaluated on the planned
    schedule (areas per token in the shape run's batch) and shifted to end at that loss.

    Raises:
        RunFileError, FitError: unreadable runs or recipes, too few runs, failed fits.
    """
    from megatron_tinyllama.scaling.protocol import bootstrap_law, fit_laws
    from megatron_tinyllama.scaling.runs import STACK_EVAL, load_runs

    if not recipes:
        raise FitError("forecast --plan: give the planned run's recipe(s) with --recipe")
    runs = load_runs(run_dirs)
    law_fit = fit_laws(runs, STACK_EVAL, description=f"{len(runs)} small runs")
    cfgs = load_recipes(recipes)
    segments = [segment_of(cfgs[0])]
    for cfg in cfgs[1:]:
        segments.append(segment_of(cfg, segments[-1].end_tokens))
    params = cfgs[-1].model.num_parameters()
    tokens = cfgs[-1].train.train_tokens
    shape_dir = max(zip(runs, run_dirs), key=lambda rd: (rd[0].params, rd[0].tokens))[1]
    history = load_history(shape_dir)
    shape = forecast_history(history, decay=decay, replicates=replicates,
                             confidence=confidence, seed=seed)
    # The target's schedule, its areas in the shape run's reference step (the law is per token).
    target = build_schedule(segments)
    areas = lr_areas(target.lr, target.step_tokens, history.segments[0].batch_tokens, decay)
    cidx = curve_indices(target)
    est = shape.fit.law(areas.s1[cidx], areas.s2[cidx])
    curve = Forecast(fit=shape.fit, schedule=target, decay=decay, loss_kind=shape.loss_kind,
                     fitted_tokens=shape.fitted_tokens, fitted_loss=shape.fitted_loss,
                     measured_tokens=np.empty(0), measured_steps=np.empty(0, dtype=int),
                     measured_loss=np.empty(0), curve_index=cidx,
                     band=CurveBand(estimate=est, low=est, high=est, confidence=confidence,
                                    replicates=0), areas=areas)
    final = float(law_fit.loss_fit.law.at(params, tokens))
    boot = bootstrap_law(law_fit, [params], [tokens], replicates, confidence, seed)
    return PlanForecast(law_fit=law_fit, shape_run=str(shape_dir), curve=curve, params=params,
                        tokens=tokens, final_loss=final,
                        band=(boot.loss[0].low, boot.loss[0].high), shift=final - float(est[-1]),
                        schedule=target, reference_tokens=float(history.segments[0].batch_tokens))
