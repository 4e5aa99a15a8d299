"""Scaling laws of Gadre et al. (2024) and their fits: pure functions on arrays, no I/O.

Two laws (equation numbers of "Language models scale reliably with over-training and on
downstream tasks"):

* Eq. 4, loss vs compute and over-training: ``L(C, M) = E + (a·M^η + b·M^-η)·C^-η`` with
  ``C = 6·N·D`` training FLOPs and ``M = D/N`` the token multiplier (M = 20 is about
  compute-optimal). Equivalently ``L = E + a·6^-η·N^-2η + b·6^-η·D^-2η``, a Chinchilla law with
  tied exponents.
* Eq. 5, average top-1 error vs loss: ``Err(L) = ε − k·exp(−γ·L)``.

Both are fitted by non-linear least squares on linear residuals with Levenberg–Marquardt
(:func:`scipy.optimize.curve_fit`), started from a grid of initial values, keeping the lowest
residual, as the paper's released code does. Predictions chain ``(C, M) → L → Err``; bootstrap
percentile intervals come from refitting on resampled points.

Anything that cannot give a finite answer raises :class:`FitError` with a message saying why.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import astuple, dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

from megatron_tinyllama.scaling.errors import FitError, ScalingError  # noqa: F401 - also the API here


# Eq. 4 starts: the grid of the paper's released fitting code (mlfoundations/scaling), written in
# this module's (E, a, b, η) parametrisation. On the paper's runs every start lands on the same
# optimum; the grid is there for users' own runs, where the surface may be less kind.
LOSS_INIT_GRID: tuple[tuple[float, float, float, float], ...] = tuple(
    itertools.product(
        (0.0, 1.0, 2.0, 10.0), (1e2, 3e2, 1e3, 3e3), (1e2, 3e2, 1e3, 3e3), (0.05, 0.15)
    )
)
# Eq. 5 starts (ε, k, γ). The paper fits from scipy's default (1, 1, 1), which is in the grid; some
# starts collapse to a flat line at the mean error, which the lowest-residual rule discards.
ERROR_INIT_GRID: tuple[tuple[float, float, float], ...] = tuple(
    itertools.product((0.5, 0.75, 1.0), (0.5, 1.0, 2.0, 5.0, 10.0), (0.1, 0.3, 1.0, 3.0))
)
MAX_EVALS = 10000
"""Function evaluations per Levenberg–Marquardt start (the paper's maxfev)."""


def compute_flops(params: np.ndarray | float, tokens: np.ndarray | float) -> np.ndarray:
    """Training compute ``C = 6·N·D`` in FLOPs (forward + backward, no attention term)."""
    return 6.0 * np.asarray(params, dtype=float) * np.asarray(tokens, dtype=float)


def loss_law(compute, multiplier, E: float, a: float, b: float, eta: float) -> np.ndarray:
    """Eq. 4: ``E + (a·M^η + b·M^-η)·C^-η``."""
    compute = np.asarray(compute, dtype=float)
    multiplier = np.asarray(multiplier, dtype=float)
    return E + (a * multiplier**eta + b * multiplier ** (-eta)) * compute ** (-eta)


def error_law(loss, epsilon: float, k: float, gamma: float) -> np.ndarray:
    """Eq. 5: ``ε − k·exp(−γ·L)``."""
    return epsilon - k * np.exp(-gamma * np.asarray(loss, dtype=float))


@dataclass(frozen=True)
class LossLaw:
    """Parameters of Eq. 4."""

    E: float
    """Irreducible loss."""
    a: float
    b: float
    eta: float
    """Compute exponent η; the parameter exponent of the Chinchilla form is 2η."""

    def __call__(self, compute, multiplier) -> np.ndarray:
        return loss_law(compute, multiplier, self.E, self.a, self.b, self.eta)

    def at(self, params, tokens) -> np.ndarray:
        """Loss of a model with ``params`` parameters trained on ``tokens`` tokens."""
        params = np.asarray(params, dtype=float)
        tokens = np.asarray(tokens, dtype=float)
        return self(compute_flops(params, tokens), tokens / params)


@dataclass(frozen=True)
class ErrorLaw:
    """Parameters of Eq. 5."""

    epsilon: float
    """Error as the loss grows without bound (about random chance)."""
    k: float
    gamma: float

    def __call__(self, loss) -> np.ndarray:
        return error_law(loss, self.epsilon, self.k, self.gamma)


@dataclass(frozen=True)
class LossFit:
    """A fitted Eq. 4 and the region of (C, M) it has seen."""

    law: LossLaw
    compute_range: tuple[float, float]
    multiplier_range: tuple[float, float]
    num_points: int
    rms_residual: float
    converged_starts: int
    """Starts of the init grid that converged (out of ``total_starts``)."""
    total_starts: int


@dataclass(frozen=True)
class ErrorFit:
    """A fitted Eq. 5 and the losses it has seen."""

    law: ErrorLaw
    loss_range: tuple[float, float]
    num_points: int
    rms_residual: float
    converged_starts: int
    total_starts: int


def _as_points(name: str, columns: dict[str, Sequence[float]], min_points: int) -> list[np.ndarray]:
    arrays = [np.asarray(v, dtype=float).reshape(-1) for v in columns.values()]
    sizes = {a.size for a in arrays}
    if len(sizes) != 1:
        shapes = ", ".join(f"{k}={np.size(v)}" for k, v in columns.items())
        raise FitError(f"{name}: inputs differ in length ({shapes})")
    n = sizes.pop()
    if n < min_points:
        raise FitError(
            f"{name}: needs at least {min_points} points (one more than its parameters), got {n}"
        )
    for key, arr in zip(columns, arrays, strict=True):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise FitError(f"{name}: {key} is not finite at point(s) {bad.tolist()}")
    return arrays


def _best_of_starts(func, x, y, starts, max_evals: int):
    """Run curve_fit (Levenberg–Marquardt) from every start; the lowest sum of squares wins."""
    best, best_sse, converged = None, math.inf, 0
    for p0 in starts:
        try:
            with warnings.catch_warnings():
                # 1 degree of freedom makes pcov warnings routine; overflow in a wild start is
                # caught below as a non-finite result.
                warnings.simplefilter("ignore", OptimizeWarning)
                with np.errstate(all="ignore"):
                    popt, _ = curve_fit(func, x, y, p0=list(p0), maxfev=max_evals, method="lm")
                    sse = float(np.sum((y - func(x, *popt)) ** 2))
        except (RuntimeError, ValueError, FloatingPointError, OverflowError):
            continue  # MINPACK gave up (maxfev) or hit NaN: try the next start
        if not (np.all(np.isfinite(popt)) and math.isfinite(sse)):
            continue
        converged += 1
        if sse < best_sse:
            best, best_sse = popt, sse
    return best, best_sse, converged


def fit_loss_law(
    compute: Sequence[float],
    multiplier: Sequence[float],
    loss: Sequence[float],
    *,
    starts: Sequence[Sequence[float]] = LOSS_INIT_GRID,
    max_evals: int = MAX_EVALS,
) -> LossFit:
    """Fit Eq. 4 to runs given by compute C, token multiplier M and loss.

    Args:
        compute: training FLOPs ``6·N·D`` of each run.
        multiplier: ``D/N`` of each run.
        loss: validation loss of each run.
        starts: initial ``(E, a, b, η)`` values; the converged start with the lowest residual wins.
        max_evals: function evaluations allowed per start.

    Returns:
        The fit, with the ranges of C and M it has seen (to flag extrapolation).

    Raises:
        FitError: fewer than 5 points, a single multiplier (a and b are then not identifiable),
            non-finite or non-positive inputs, or no start converged.
    """
    C, M, L = _as_points(
        "Eq. 4 fit", {"compute": compute, "multiplier": multiplier, "loss": loss}, 5
    )
    for key, arr in (("compute", C), ("multiplier", M), ("loss", L)):
        if np.any(arr <= 0):
            raise FitError(f"Eq. 4 fit: {key} must be positive, got {arr[arr <= 0].tolist()}")
    if np.unique(M).size < 2:
        raise FitError(
            f"Eq. 4 fit: all runs have the same token multiplier M={M[0]:g}; a·M^η and b·M^-η "
            "cannot be told apart without at least two multipliers (add an over-trained run)"
        )
    func = lambda x, E, a, b, eta: loss_law(x[0], x[1], E, a, b, eta)  # noqa: E731
    best, sse, converged = _best_of_starts(func, np.vstack([C, M]), L, starts, max_evals)
    if best is None:
        raise FitError(
            f"Eq. 4 fit did not converge from any of {len(starts)} starts "
            f"({max_evals} evaluations each) on {C.size} points"
        )
    return LossFit(
        law=LossLaw(*(float(v) for v in best)),
        compute_range=(float(C.min()), float(C.max())),
        multiplier_range=(float(M.min()), float(M.max())),
        num_points=int(C.size),
        rms_residual=math.sqrt(sse / C.size),
        converged_starts=converged,
        total_starts=len(starts),
    )


def fit_error_law(
    loss: Sequence[float],
    error: Sequence[float],
    *,
    starts: Sequence[Sequence[float]] = ERROR_INIT_GRID,
    max_evals: int = MAX_EVALS,
) -> ErrorFit:
    """Fit Eq. 5 to (loss, average top-1 error) pairs.

    Args:
        loss: validation loss of each run.
        error: average top-1 error (a fraction in [0, 1]) of the same runs.
        starts: initial ``(ε, k, γ)`` values; the converged start with the lowest residual wins.
        max_evals: function evaluations allowed per start.

    Raises:
        FitError: fewer than 4 points, fewer than 3 distinct losses, non-finite inputs, errors
            outside [0, 1], or no start converged.
    """
    L, Err = _as_points("Eq. 5 fit", {"loss": loss, "error": error}, 4)
    if np.any((Err < 0) | (Err > 1)):
        raise FitError(
            "Eq. 5 fit: errors must be fractions in [0, 1], got "
            f"{Err[(Err < 0) | (Err > 1)].tolist()}"
        )
    if np.unique(L).size < 3:
        raise FitError("Eq. 5 fit: needs at least 3 distinct losses to fit 3 parameters")
    func = lambda x, eps, k, gamma: error_law(x, eps, k, gamma)  # noqa: E731
    best, sse, converged = _best_of_starts(func, L, Err, starts, max_evals)
    if best is None:
        raise FitError(
            f"Eq. 5 fit did not converge from any of {len(starts)} starts on {L.size} points"
        )
    return ErrorFit(
        law=ErrorLaw(*(float(v) for v in best)),
        loss_range=(float(L.min()), float(L.max())),
        num_points=int(L.size),
        rms_residual=math.sqrt(sse / L.size),
        converged_starts=converged,
        total_starts=len(starts),
    )


def relative_error(predicted, measured) -> np.ndarray:
    """``|predicted − measured| / |measured|``, the paper's relative prediction error."""
    predicted = np.asarray(predicted, dtype=float)
    measured = np.asarray(measured, dtype=float)
    if np.any(measured == 0):
        raise FitError("relative error: a measured value is 0")
    return np.abs(predicted - measured) / np.abs(measured)


def extrapolation_notes(
    loss_fit: LossFit,
    compute: float,
    multiplier: float,
    error_fit: Optional[ErrorFit] = None,
    predicted_loss: Optional[float] = None,
) -> list[str]:
    """Say how far a request lies outside what the fits have seen; empty when inside.

    Scaling laws exist to extrapolate in compute, so a large compute ratio is expected; the
    notes let a reader weigh the prediction (the paper's held-out runs are 10–300x beyond).
    """
    notes = []
    c_lo, c_hi = loss_fit.compute_range
    m_lo, m_hi = loss_fit.multiplier_range
    if compute > c_hi:
        notes.append(
            f"compute C={compute:.3g} is {compute / c_hi:.3g}x the largest fitted ({c_hi:.3g})"
        )
    elif compute < c_lo:
        notes.append(f"compute C={compute:.3g} is below the smallest fitted ({c_lo:.3g})")
    if not m_lo <= multiplier <= m_hi:
        notes.append(
            f"token multiplier M={multiplier:.4g} is outside the fitted range [{m_lo:g}, {m_hi:g}]"
        )
    if error_fit is not None and predicted_loss is not None:
        l_lo, l_hi = error_fit.loss_range
        if not l_lo <= predicted_loss <= l_hi:
            notes.append(
                f"loss {predicted_loss:.4f} is outside the losses the error law has seen "
                f"[{l_lo:.4f}, {l_hi:.4f}]"
            )
    return notes


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap percentile interval."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class BootstrapResult:
    """Bootstrap intervals of chained predictions, one entry per target."""

    loss: tuple[Interval, ...]
    error: Optional[tuple[Interval, ...]]
    confidence: float
    replicates: int
    """Resamples whose fits converged (the intervals use only these)."""
    requested: int


def _resample(rng: np.random.Generator, n: int, min_unique: int) -> np.ndarray:
    # With 5 points and 4 parameters most resamples repeat points; one with fewer distinct points
    # than parameters cannot determine the law, so draw again (bounded).
    for _ in range(1000):
        idx = rng.integers(0, n, size=n)
        if np.unique(idx).size >= min_unique:
            return idx
    raise FitError(f"bootstrap: could not draw {min_unique} distinct points out of {n}")


def bootstrap_predictions(
    loss_points: tuple[Sequence[float], Sequence[float], Sequence[float]],
    targets: tuple[Sequence[float], Sequence[float]],
    *,
    error_points: Optional[tuple[Sequence[float], Sequence[float]]] = None,
    loss_fit: Optional[LossFit] = None,
    error_fit: Optional[ErrorFit] = None,
    replicates: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Percentile bootstrap of the chained prediction ``(C, M) → L → Err``.

    Each replicate resamples the loss-law points (and, independently, the error-law points) with
    replacement, refits, and predicts every target. Refits start from the full-data optimum (and
    a few grid points) so a replicate costs milliseconds. Replicates whose points cannot determine
    the law (fewer distinct points than parameters, or, for Eq. 4, a single token multiplier) or
    whose fit does not converge are dropped and counted in ``replicates``; with the paper's five
    runs about a fifth are, so the interval is conditional on keeping an over-trained run.

    Args:
        loss_points: ``(compute, multiplier, loss)`` the loss law was fitted on.
        targets: ``(compute, multiplier)`` arrays to predict.
        error_points: ``(loss, error)`` the error law was fitted on; None skips the error chain.
        loss_fit, error_fit: full-data fits (refitted here when None).
        replicates: resamples to draw.
        confidence: central probability of the interval.
        seed: RNG seed, for reproducible intervals.

    Raises:
        FitError: invalid points, or fewer than half the replicates converged.
    """
    if not 0 < confidence < 1:
        raise FitError(f"bootstrap: confidence must be in (0, 1), got {confidence}")
    if replicates < 10:
        raise FitError(f"bootstrap: needs at least 10 replicates, got {replicates}")
    C, M, L = (np.asarray(v, dtype=float) for v in loss_points)
    tC, tM = (np.atleast_1d(np.asarray(v, dtype=float)) for v in targets)
    loss_fit = loss_fit or fit_loss_law(C, M, L)
    loss_starts = [astuple(loss_fit.law)] + list(LOSS_INIT_GRID[::37])
    if error_points is not None:
        eL, eE = (np.asarray(v, dtype=float) for v in error_points)
        error_fit = error_fit or fit_error_law(eL, eE)
        error_starts = [astuple(error_fit.law)] + list(ERROR_INIT_GRID[::17])

    rng = np.random.default_rng(seed)
    loss_preds, error_preds = [], []
    for _ in range(replicates):
        idx = _resample(rng, C.size, min_unique=4)
        try:
            law = fit_loss_law(C[idx], M[idx], L[idx], starts=loss_starts).law
            pred_loss = law(tC, tM)
            if error_points is not None:
                jdx = _resample(rng, eL.size, min_unique=3)
                pred_err = fit_error_law(eL[jdx], eE[jdx], starts=error_starts).law(pred_loss)
        except FitError:
            continue
        if not np.all(np.isfinite(pred_loss)) or (
            error_points is not None and not np.all(np.isfinite(pred_err))
        ):
            continue
        loss_preds.append(pred_loss)
        if error_points is not None:
            error_preds.append(pred_err)
    if len(loss_preds) < replicates / 2:
        raise FitError(
            f"bootstrap: only {len(loss_preds)} of {replicates} replicates converged; the points "
            "do not constrain the law well enough for an interval"
        )

    tail = 100 * (1 - confidence) / 2

    def intervals(estimates: np.ndarray, draws: list[np.ndarray]) -> tuple[Interval, ...]:
        lo, hi = np.percentile(np.vstack(draws), [tail, 100 - tail], axis=0)
        return tuple(
            Interval(float(e), float(a), float(b))
            for e, a, b in zip(estimates, lo, hi, strict=True)
        )

    point_loss = loss_fit.law(tC, tM)
    return BootstrapResult(
        loss=intervals(point_loss, loss_preds),
        error=intervals(error_fit.law(point_loss), error_preds)
        if error_points is not None
        else None,
        confidence=confidence,
        replicates=len(loss_preds),
        requested=replicates,
    )
