"""This module owns the forecast's picture (``tinyllama-scaling forecast --png``): the measured
points, the law's curve and its band, the stages and the caveats, as a PNG a person reads.
matplotlib runs on the Agg backend so plotting works without a display."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from megatron_tinyllama.scaling.plots import _pyplot, _save



def plot_forecast(forecast_json: dict, path: Union[str, Path], *,
                  measured: Optional[tuple[Sequence[float], Sequence[float]]] = None,
                  fitted_until_tokens: Optional[float] = None, title: str = "") -> Path:
    """:func:`forecast_figure` written to ``path`` as PNG."""
    plt = _pyplot()
    fig = forecast_figure(forecast_json, measured=measured,
                          fitted_until_tokens=fitted_until_tokens, title=title)
    return _save(fig, plt, path, dpi=110)


def forecast_figure(forecast_json: dict, *,
                    measured: Optional[tuple[Sequence[float], Sequence[float]]] = None,
                    fitted_until_tokens: Optional[float] = None, title: str = ""):
    """A loss-curve forecast (``Forecast.to_json()``) a person can read: the measured points
    (fitted ones filled; the burn-in's and later ones marked as not fitted), the law's curve and
    its band from the first fitted point on, the stage boundaries, and the caveats in the title.

    The y-axis spans the measured losses and the forecast, not the law through the warm-up (where
    it runs to 1e13 as S1 goes to 0 and the run becomes a flat line at the bottom).

    Args:
        forecast_json: the forecast as the CLI writes it.
        measured: (tokens, loss) of the run's measured points.
        fitted_until_tokens: points after this were not fitted (a dotted line marks it).
        title: the figure's first title line (default: the forecast end and its band).
    """
    plt = _pyplot()
    curve = forecast_json["curve"]
    fit = forecast_json.get("fit", {})
    fitted_from = float(fit.get("from_tokens", 0.0))
    t = np.array([c["tokens"] for c in curve], dtype=float)
    shown = t >= fitted_from  # the law is not the run's before the burn-in, nor in the warm-up
    t = t[shown]
    est = np.array([c["loss"] for c in curve], dtype=float)[shown]
    low = np.array([c["low"] for c in curve], dtype=float)[shown]
    high = np.array([c["high"] for c in curve], dtype=float)[shown]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    confidence = 100 * forecast_json.get("confidence", 0.95)
    ax.fill_between(t, low, high, color="tab:orange", alpha=0.25, lw=0,
                    label=f"{confidence:g}% band (with the law's own uncertainty)")
    ax.plot(t, est, color="tab:orange", lw=1.5, label="curve law")
    # The y-range: the measured losses and the forecast, not the band (a forecast that the points
    # do not pin has a band of +-30 that would flatten the run again; its caveats say so).
    values = [est]
    if measured is not None and len(measured[0]):
        mt, ml = np.asarray(measured[0], dtype=float), np.asarray(measured[1], dtype=float)
        until = fitted_until_tokens if fitted_until_tokens is not None else np.inf
        burn = mt < fitted_from
        later = mt > until
        fitted = ~burn & ~later
        ax.plot(mt[fitted], ml[fitted], "o", ms=4, color="tab:blue", label="measured, fitted")
        if burn.any():
            ax.plot(mt[burn], ml[burn], "x", ms=4, color="gray",
                    label="measured, burn-in (not fitted)")
        if later.any():
            ax.plot(mt[later], ml[later], "o", ms=4, mfc="none", color="tab:blue",
                    label="measured after the fit (not fitted)")
        values.append(ml)
    if fitted_until_tokens is not None:
        ax.axvline(fitted_until_tokens, color="gray", ls=":", lw=1)
    values = np.concatenate([np.asarray(v, dtype=float).ravel() for v in values])
    values = values[np.isfinite(values)]
    y_lo, y_hi = float(values.min()), float(values.max())
    pad = 0.05 * max(y_hi - y_lo, 1e-3 * max(abs(y_hi), 1.0))
    ax.set_ylim(y_lo - pad, y_hi + pad)
    for stage in forecast_json.get("stages", [])[1:]:
        ax.axvline(stage["start_tokens"], color="black", ls="--", lw=0.8)
        ax.text(stage["start_tokens"], y_hi + pad, f" {stage['name']}", va="top", fontsize=8)
    ax.set_xlabel("tokens")
    ax.set_ylabel(f"loss ({fit.get('loss', 'valid_loss')})")
    head = title or (f"forecast final loss {forecast_json['final_loss']:.4f}, {confidence:g}% band "
                     f"[{forecast_json['band'][0]:.4f}, {forecast_json['band'][1]:.4f}]")
    keys = forecast_json.get("caveat_keys", [])
    second = ("caveats: " + ", ".join(keys) + " (see the command's output)") if keys \
        else "no caveat"
    ax.set_title(f"{head}\n{second}", fontsize=10, color="black")
    if keys:
        ax.title.set_color("tab:red")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig
