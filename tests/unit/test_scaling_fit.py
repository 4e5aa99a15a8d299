"""Scaling-law fits on synthetic data drawn from known parameters, and their failure modes."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_tinyllama.scaling.fit import (
    ErrorLaw,
    FitError,
    LossLaw,
    bootstrap_predictions,
    extrapolation_notes,
    fit_error_law,
    fit_loss_law,
    relative_error,
)

TRUE_LOSS = LossLaw(E=1.9, a=180.0, b=420.0, eta=0.13)
TRUE_ERROR = ErrorLaw(epsilon=0.86, k=2.3, gamma=0.72)


def _grid(noise: float = 0.0, seed: int = 0):
    """Runs like the testbed's: four sizes at M = 20 plus over-trained and under-trained ones."""
    params = np.array([1e7, 8e7, 1.5e8, 4e8, 1e7, 8e7, 1e7, 1.5e8])
    mults = np.array([20, 20, 20, 20, 320, 80, 5, 640], dtype=float)
    tokens = params * mults
    compute = 6 * params * tokens
    loss = TRUE_LOSS(compute, mults)
    loss = loss + np.random.default_rng(seed).normal(0, noise, loss.size)
    return compute, mults, loss


def test_loss_law_recovers_known_parameters():
    C, M, L = _grid()
    fit = fit_loss_law(C, M, L)
    got = fit.law
    assert got.E == pytest.approx(TRUE_LOSS.E, rel=1e-4)
    assert got.eta == pytest.approx(TRUE_LOSS.eta, rel=1e-4)
    assert got.a == pytest.approx(TRUE_LOSS.a, rel=1e-3)
    assert got.b == pytest.approx(TRUE_LOSS.b, rel=1e-3)
    assert fit.rms_residual < 1e-8
    assert fit.converged_starts >= 1
    assert fit.compute_range == (C.min(), C.max())
    assert fit.multiplier_range == (5.0, 640.0)


def test_loss_law_with_noise_extrapolates_within_a_percent():
    C, M, L = _grid(noise=0.005, seed=1)
    law = fit_loss_law(C, M, L).law
    # A 7B compute-optimal run: ~100x the largest fitted compute.
    n = 7e9
    c_big, m_big = 6 * n * 20 * n, 20.0
    assert float(relative_error(law(c_big, m_big), TRUE_LOSS(c_big, m_big))) < 0.01
    assert law.eta == pytest.approx(TRUE_LOSS.eta, rel=0.15)


def test_eq4_equals_its_chinchilla_form():
    n, d = 4e8, 8e9
    eta = TRUE_LOSS.eta
    chinchilla = (
        TRUE_LOSS.E
        + TRUE_LOSS.a * 6**-eta * n ** (-2 * eta)
        + TRUE_LOSS.b * 6**-eta * d ** (-2 * eta)
    )
    assert float(TRUE_LOSS.at(n, d)) == pytest.approx(chinchilla, rel=1e-12)


def test_error_law_recovers_known_parameters():
    L = np.linspace(2.4, 5.6, 7)
    fit = fit_error_law(L, TRUE_ERROR(L))
    assert fit.law.epsilon == pytest.approx(TRUE_ERROR.epsilon, rel=1e-4)
    assert fit.law.k == pytest.approx(TRUE_ERROR.k, rel=1e-3)
    assert fit.law.gamma == pytest.approx(TRUE_ERROR.gamma, rel=1e-3)
    assert fit.loss_range == (2.4, 5.6)


def test_too_few_points_is_a_clear_error():
    C, M, L = _grid()
    with pytest.raises(FitError, match="at least 5 points.*got 4"):
        fit_loss_law(C[:4], M[:4], L[:4])
    with pytest.raises(FitError, match="at least 4 points.*got 3"):
        fit_error_law([3.0, 4.0, 5.0], [0.5, 0.6, 0.7])


def test_single_multiplier_cannot_identify_a_and_b():
    C, M, L = _grid()
    keep = M == 20
    with pytest.raises(FitError, match="same token multiplier"):
        fit_loss_law(C[keep].tolist() + [C[0] * 3], [20.0] * 5, L[keep].tolist() + [L[0] - 0.1])


def test_non_finite_and_bad_inputs_never_become_nan():
    C, M, L = _grid()
    L = L.copy()
    L[2] = np.nan
    with pytest.raises(FitError, match=r"loss is not finite at point\(s\) \[2\]"):
        fit_loss_law(C, M, L)
    with pytest.raises(FitError, match="differ in length"):
        fit_loss_law(C, M[:-1], L)
    with pytest.raises(FitError, match="compute must be positive"):
        fit_loss_law(-C, M, np.abs(np.nan_to_num(L, nan=3.0)))
    with pytest.raises(FitError, match=r"fractions in \[0, 1\]"):
        fit_error_law([2.5, 3.0, 3.5, 4.0], [45.0, 55.0, 60.0, 70.0])  # percentages, not fractions


def test_fit_that_does_not_converge_says_so():
    C, M, L = _grid()
    with pytest.raises(FitError, match="did not converge from any of 2 starts"):
        fit_loss_law(C, M, L, starts=[(0.0, 1e2, 1e2, 0.05), (1.0, 3e2, 3e2, 0.15)], max_evals=3)
    with pytest.raises(FitError, match="did not converge"):
        fit_error_law(np.linspace(2, 5, 5), TRUE_ERROR(np.linspace(2, 5, 5)), max_evals=2)


def test_relative_error_and_extrapolation_notes():
    assert float(relative_error(2.52, 2.50)) == pytest.approx(0.008)
    with pytest.raises(FitError, match="measured value is 0"):
        relative_error(1.0, 0.0)
    C, M, L = _grid()
    fit = fit_loss_law(C, M, L)
    inside = float(np.sqrt(C.min() * C.max()))
    assert extrapolation_notes(fit, inside, 20.0) == []
    notes = extrapolation_notes(fit, C.max() * 100, 2700.0)
    assert any("100x the largest fitted" in n for n in notes)
    assert any("M=2700 is outside the fitted range [5, 640]" in n for n in notes)
    efit = fit_error_law(np.linspace(2.4, 5.6, 7), TRUE_ERROR(np.linspace(2.4, 5.6, 7)))
    assert any("error law has seen" in n for n in extrapolation_notes(fit, inside, 20.0, efit, 2.0))


def test_bootstrap_interval_covers_truth_and_is_reproducible():
    C, M, L = _grid(noise=0.01, seed=3)
    eL = np.linspace(2.4, 5.6, 8)
    eE = TRUE_ERROR(eL) + np.random.default_rng(4).normal(0, 0.005, eL.size)
    n = 1.4e9
    target = ([6 * n * 640 * n], [640.0])
    kwargs = dict(error_points=(eL, eE), replicates=60, seed=7)
    res = bootstrap_predictions((C, M, L), target, **kwargs)
    again = bootstrap_predictions((C, M, L), target, **kwargs)
    assert res == again
    assert res.replicates >= 30 and res.requested == 60
    (li,), (ei,) = res.loss, res.error
    assert li.low <= li.estimate <= li.high and ei.low <= ei.estimate <= ei.high
    assert li.low <= float(TRUE_LOSS(*[t[0] for t in target])) <= li.high
    assert 0 < li.high - li.low < 0.5
    with pytest.raises(FitError, match="confidence"):
        bootstrap_predictions((C, M, L), target, confidence=95)
