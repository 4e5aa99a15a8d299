"""This module owns the loss-curve law of Tissue et al. (2024), "Scaling Law with Learning Rate
Annealing" (arXiv 2408.11029), its learning-rate areas, its fit and its bootstrap band: pure
functions on arrays, no I/O.

The law gives the validation loss after step ``s`` of any learning-rate schedule::

    L(s) = L0 + A * S1(s)^(-alpha) - C * S2(s)

* ``S1 = sum_i eta_i``: the forward area, the area under the LR curve so far.
* ``S2 = sum_i m_i`` with ``m_i = lambda * m_{i-1} + (eta_{i-1} - eta_i)``: the annealing area, the
  LR drops accumulated with a momentum-like decay ``lambda`` (0.999 in the paper), so a drop keeps
  lowering the loss for ~1/(1-lambda) steps after it happened.

**Warm-up.** The paper counts the warm-up in S1 but not in S2 (a rising LR is not an annealing):
drops are counted from the first step whose LR does not exceed the previous one, and points
inside the warm-up are not fitted.

**Batch changes (areas per token).** The law is written per optimizer step of a fixed batch. A
stage that grows the batch (TinyLlama v1.1's cooldown: 4x) takes fewer, larger steps over the
same tokens, and what the loss sees is the LR curve per *token*. So the areas are accumulated in
*reference steps* of ``reference_tokens`` tokens (the first stage's batch): a step of ``B`` tokens
at LR ``eta`` counts as ``k = B / reference_tokens`` reference steps at ``eta``, i.e. adds
``k * eta`` to S1. For S2 the step is ``k`` reference steps whose first one carries the LR drop and
the rest none: ``m <- lambda * m + drop`` then ``S2 += m * (1 - lambda^k) / (1 - lambda)`` and
``m <- m * lambda^(k-1)``, which reduces to the paper's recursion when ``k = 1`` and gives the
same areas as running the per-token curve at the reference batch (tested). ``lambda`` is
therefore a decay per reference step.

``batch_exponent`` p generalises the count to ``k = (B / reference_tokens)^p``: p = 1 is the per
token reading above (the default); p = 0.5 counts a step of 4x the batch as 2 reference steps, the
square-root scaling rule of Adam (Malladi et al. 2022: a batch of kB at LR sqrt(k)*eta follows
the same SDE as k steps of B at eta). On the CPU benchmark's 4x-batch stage (docs/forecast.md)
p = 0.5 forecast the stage's end within 0.1-0.6% at three seeds where p = 1 was 1.5-2.6% low.

**Fit.** For a fixed ``alpha`` the law is linear in ``(L0, A, C)``; those are solved by
non-negative least squares (every term has its physical sign) and ``alpha`` by a grid then a
bounded scalar search (variable projection). This has no starting point to get wrong and costs
about a millisecond on a few hundred points, cheap enough to refit at every evaluation of a run.

**Band.** A bootstrap over the fitted points: each replicate resamples them with replacement,
refits, predicts, and adds a residual of the full fit drawn at random, so the band is a
prediction interval for a measured loss (parameter uncertainty plus evaluation noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import minimize_scalar, nnls

from megatron_tinyllama.scaling.errors import FitError

DEFAULT_DECAY = 0.999
"""The paper's lambda, per reference step."""
ALPHA_GRID = np.geomspace(0.02, 4.0, 48)
"""Exponents tried before the bounded refinement (the paper's fits land around 0.3-0.6)."""


@dataclass(frozen=True)
class Areas:
    """The law's areas after every step of a schedule."""

    s1: np.ndarray
    """Forward area ``sum eta`` after each step, in LR x reference steps."""
    s2: np.ndarray
    """Annealing area after each step."""
    warmup_steps: int
    """Steps of the schedule that are warm-up (S2 is zero over them; they are not fitted)."""


def warmup_length(lr: Sequence[float]) -> int:
    """Steps before the first one whose LR does not exceed its predecessor's (0 without warm-up)."""
    lr = np.asarray(lr, dtype=float)
    rising = np.flatnonzero(np.diff(lr) <= 0)
    return int(rising[0]) + 1 if rising.size else int(lr.size)


def lr_areas(
    lr: Sequence[float],
    step_tokens: Sequence[float] | float,
    reference_tokens: float,
    decay: float = DEFAULT_DECAY,
    batch_exponent: float = 1.0,
) -> Areas:
    """S1 and S2 after every step of a schedule whose steps may have different batches.

    Args:
        lr: learning rate used by each optimizer step, in order.
        step_tokens: tokens of each step (one number for a fixed batch).
        reference_tokens: tokens of one reference step (the areas' unit; the first stage's batch).
        decay: lambda, per reference step.
        batch_exponent: a step of B tokens counts as ``(B / reference_tokens)^batch_exponent``
            reference steps (1: per token; 0.5: Adam's square-root rule).

    Raises:
        FitError: empty or non-finite LRs, non-positive tokens, lambda outside (0, 1), or a
            batch exponent outside [0, 1].
    """
    eta = np.asarray(lr, dtype=float).reshape(-1)
    if eta.size == 0 or not np.all(np.isfinite(eta)) or np.any(eta < 0):
        raise FitError("curve areas: the learning rates must be finite, non-negative and not empty")
    k = np.broadcast_to(np.asarray(step_tokens, dtype=float), eta.shape) / float(reference_tokens)
    if not np.all(np.isfinite(k)) or np.any(k <= 0):
        raise FitError("curve areas: tokens per step and reference_tokens must be positive")
    if not 0 <= batch_exponent <= 1:
        raise FitError(f"curve areas: batch exponent must be in [0, 1], got {batch_exponent}")
    k = k ** batch_exponent
    if not 0 < decay < 1:
        raise FitError(f"curve areas: decay lambda must be in (0, 1), got {decay}")
    s1 = np.cumsum(eta * k)
    warm = warmup_length(eta)
    s2 = np.zeros_like(eta)
    m = total = 0.0
    for i in range(max(warm, 1), eta.size):
        m = decay * m + (eta[i - 1] - eta[i])
        # k_i reference steps: the first carries the drop, the next k_i - 1 only decay it.
        total += m * (1.0 - decay ** k[i]) / (1.0 - decay)
        m *= decay ** (k[i] - 1.0)
        s2[i] = total
    return Areas(s1=s1, s2=s2, warmup_steps=warm)


def curve_law(s1, s2, L0: float, A: float, alpha: float, C: float) -> np.ndarray:
    """``L0 + A * S1^-alpha - C * S2``."""
    return L0 + A * np.asarray(s1, dtype=float) ** (-alpha) - C * np.asarray(s2, dtype=float)


@dataclass(frozen=True)
class CurveLaw:
    """Parameters of the law (S1, S2 in the units of :func:`lr_areas`)."""

    L0: float
    """Loss after infinite forward area without annealing (an asymptote, not a floor)."""
    A: float
    alpha: float
    C: float
    """Loss removed per unit of annealing area."""

    def __call__(self, s1, s2) -> np.ndarray:
        return curve_law(s1, s2, self.L0, self.A, self.alpha, self.C)


@dataclass(frozen=True)
class CurveFit:
    """A fitted law, the points it saw and how well it matched them."""

    law: CurveLaw
    num_points: int
    rms_residual: float
    residuals: np.ndarray
    """Measured minus fitted loss at each fitted point (drawn by the bootstrap band)."""
    s1_range: tuple[float, float]


def _solve_linear(alpha: float, s1: np.ndarray, s2: np.ndarray, y: np.ndarray):
    # Columns scaled to unit norm so nnls sees a well-conditioned problem whatever the LR units.
    X = np.column_stack([np.ones_like(s1), s1 ** (-alpha), -s2])
    norms = np.linalg.norm(X, axis=0)
    norms[norms == 0] = 1.0
    coef, rnorm = nnls(X / norms, y)
    return coef / norms, rnorm * rnorm


def fit_curve(s1: Sequence[float], s2: Sequence[float], loss: Sequence[float], *,
              alpha_bracket: Optional[tuple[float, float]] = None) -> CurveFit:
    """Fit ``L = L0 + A*S1^-alpha - C*S2`` to measured losses at known areas.

    Args:
        s1, s2: areas at each measured point (from :func:`lr_areas`, indexed at the points' steps).
        loss: measured (validation) loss at each point.
        alpha_bracket: search alpha only in this interval, skipping the grid (bootstrap refits
            near a known optimum: a third of the cost).

    Raises:
        FitError: fewer than 5 points, non-finite values, or a non-positive S1.
    """
    s1, s2, y = (np.asarray(v, dtype=float).reshape(-1) for v in (s1, s2, loss))
    if not s1.size == s2.size == y.size:
        raise FitError(f"curve fit: inputs differ in length (s1={s1.size}, s2={s2.size}, "
                       f"loss={y.size})")
    if y.size < 5:
        raise FitError(f"curve fit: needs at least 5 points after warm-up, got {y.size}")
    for name, arr in (("s1", s1), ("s2", s2), ("loss", y)):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise FitError(f"curve fit: {name} is not finite at point(s) {bad.tolist()}")
    if np.any(s1 <= 0):
        raise FitError("curve fit: the forward area S1 must be positive at every point (a point "
                       "before the first step with a non-zero LR?)")
    if alpha_bracket is None:
        sse = [_solve_linear(a, s1, s2, y)[1] for a in ALPHA_GRID]
        i = int(np.argmin(sse))
        lo, hi = ALPHA_GRID[max(i - 1, 0)], ALPHA_GRID[min(i + 1, ALPHA_GRID.size - 1)]
        start, start_sse = float(ALPHA_GRID[i]), sse[i]
    else:
        lo, hi = alpha_bracket
        start = math.sqrt(lo * hi)
        start_sse = _solve_linear(start, s1, s2, y)[1]
    best = minimize_scalar(lambda a: _solve_linear(a, s1, s2, y)[1], bounds=(lo, hi),
                           method="bounded", options={"xatol": 1e-4})
    alpha = float(best.x) if best.success and best.fun <= start_sse else start
    (L0, A, C), _ = _solve_linear(alpha, s1, s2, y)
    law = CurveLaw(float(L0), float(A), alpha, float(C))
    residuals = y - law(s1, s2)
    return CurveFit(law=law, num_points=int(y.size),
                    rms_residual=float(math.sqrt(np.mean(residuals ** 2))), residuals=residuals,
                    s1_range=(float(s1.min()), float(s1.max())))


@dataclass(frozen=True)
class CurveBand:
    """A bootstrap prediction band at target areas."""

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    confidence: float
    replicates: int


def bootstrap_band(
    s1: Sequence[float],
    s2: Sequence[float],
    loss: Sequence[float],
    target_s1: Sequence[float],
    target_s2: Sequence[float],
    *,
    fit: Optional[CurveFit] = None,
    replicates: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> CurveBand:
    """Percentile band of the law's prediction at target areas, resampling the fitted points.

    Each replicate refits on the points drawn with replacement and adds one residual of the full
    fit, drawn at random, so the band covers a *measured* loss, not only the mean curve.

    Raises:
        FitError: invalid points, a confidence outside (0, 1), fewer than 10 replicates, or fewer
            than half the replicates giving a finite fit.
    """
    if not 0 < confidence < 1:
        raise FitError(f"curve band: confidence must be in (0, 1), got {confidence}")
    if replicates < 10:
        raise FitError(f"curve band: needs at least 10 replicates, got {replicates}")
    s1, s2, y = (np.asarray(v, dtype=float).reshape(-1) for v in (s1, s2, loss))
    t1, t2 = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (target_s1, target_s2))
    fit = fit or fit_curve(s1, s2, y)
    # Fitted residuals are smaller than the noise by the 4 parameters they absorbed; inflating them
    # by sqrt(n / (n - 4)) is the usual correction (without it the band under-covers, tested).
    residuals = fit.residuals * math.sqrt(y.size / max(y.size - 4, 1))
    rng = np.random.default_rng(seed)
    draws = []
    base = fit.law(s1, s2)
    bracket = (max(fit.law.alpha / 3, ALPHA_GRID[0]), min(fit.law.alpha * 3, ALPHA_GRID[-1]))
    for _ in range(replicates):
        # Residual bootstrap: the fitted curve plus resampled residuals keeps every point's areas,
        # which the law's extrapolation depends on (resampling the points themselves loses the
        # late ones that pin C and understates the spread: 74% coverage at 90% in the test).
        y_star = base + rng.choice(residuals, size=y.size)
        try:
            law = fit_curve(s1, s2, y_star, alpha_bracket=bracket).law
        except FitError:
            continue
        pred = law(t1, t2) + rng.choice(residuals, size=t1.size)
        if np.all(np.isfinite(pred)):
            draws.append(pred)
    if len(draws) < replicates / 2:
        raise FitError(f"curve band: only {len(draws)} of {replicates} bootstrap refits were "
                       "usable; the points do not constrain the law")
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(np.vstack(draws), [tail, 100 - tail], axis=0)
    return CurveBand(estimate=fit.law(t1, t2), low=lo, high=hi, confidence=confidence,
                     replicates=len(draws))
