"""PNG plots of a fit: loss vs compute per token multiplier, and top-1 error vs loss.

Targets are ``(params, tokens, measured_loss, measured_error, label)`` tuples; the measured values
may be None (a pure prediction such as TinyLlama at 3T tokens). matplotlib runs on the Agg backend
so plotting works without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

Target = tuple[float, float, Optional[float], Optional[float], str]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and cluster login nodes have no display
    import matplotlib.pyplot as plt

    return plt


_MARKERS = ("*", "D", "P", "X", "p", "h", "v", "^")


def _target_styles(plt, targets: Sequence[Target]) -> list[tuple[str, tuple]]:
    colors = plt.get_cmap("tab10").colors[1:]  # tab:blue is kept for the fitted runs
    return [(_MARKERS[i % len(_MARKERS)], colors[i % len(colors)]) for i in range(len(targets))]


def plot_loss_vs_compute(law, targets: Sequence[Target], path: Union[str, Path]) -> Path:
    """Loss vs compute C (log-log), one fitted Eq. 4 line per token multiplier M.

    Left: the whole range, fit points as filled circles. Right: a zoom on the targets, each with
    its own marker, filled at the law's prediction and hollow at the measurement if there is one.
    """
    plt = _pyplot()
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    pts = law.loss_points
    # dtype=float throughout: the testbed's held-out runs give params and tokens as Python ints,
    # whose product 6ND passes 2^63 and would make an object array that np.geomspace rejects.
    C = np.array([6 * float(p.params) * float(p.tokens) for p in pts], dtype=float)
    M = np.array([p.tokens / p.params for p in pts], dtype=float)
    L = np.array([p.loss for p in pts], dtype=float)
    tC = np.array([6 * float(t[0]) * float(t[1]) for t in targets], dtype=float)
    tM = np.array([t[1] / t[0] for t in targets], dtype=float)
    all_M = np.unique(np.round(np.concatenate([M, tM]), 3))
    norm = LogNorm(vmin=all_M.min(), vmax=max(all_M.max(), all_M.min() * 1.01))
    cmap = plt.get_cmap("viridis")
    c_hi = max(C.max(), tC.max() if tC.size else 0.0) * 2
    styles = _target_styles(plt, targets)

    fig, axes = plt.subplots(
        1, 2 if targets else 1, figsize=(12 if targets else 7, 5), squeeze=False
    )
    for i, ax in enumerate(axes[0]):
        lo = C.min() / 2 if i == 0 else tC.min() / 3
        hi = c_hi if i == 0 else tC.max() * 3
        grid = np.geomspace(lo, hi, 200)
        for m in all_M:
            ax.plot(
                grid,
                law.loss_fit.law(grid, m),
                color=cmap(norm(m)),
                lw=1.2,
                label=f"Eq. 4, M={m:.4g}",
            )
        if i == 0:
            ax.scatter(
                C,
                L,
                c=[cmap(norm(m)) for m in M],
                edgecolors="k",
                s=45,
                zorder=3,
                label="fitted runs",
            )
        for (*_, meas, _err, label), c, m, (marker, color) in zip(
            targets, tC, tM, styles, strict=True
        ):
            pred = float(law.loss_fit.law(c, m))
            text = f"{label}: pred {pred:.3f}" + (f", meas {meas:.3f}" if meas is not None else "")
            _target_markers(ax, (c, pred), (c, meas) if meas is not None else None, marker, color, text)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f" if i == 0 else "%.2f"))
        ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^21, 3x10^21 ... collide on the zoom
        ax.set_xlabel("compute C = 6ND (FLOPs)")
        ax.set_ylabel(f"loss ({law.eval_set})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_title(f"L(C, M) = E + (aM^η + bM^-η) C^-η   [{law.description}]", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="upper right")
    if targets:
        axes[0][1].set_title("targets (filled: predicted, hollow: measured)", fontsize=9)
    return _save(fig, plt, path)



def _target_markers(ax, predicted, measured, marker, color, label) -> None:
    """A held-out target: filled marker at its prediction, hollow one at its measurement."""
    ax.scatter([predicted[0]], [predicted[1]], marker=marker, s=110, color=color, edgecolors="k",
               zorder=4, label=label)
    if measured is not None:
        ax.scatter([measured[0]], [measured[1]], marker=marker, s=110, facecolors="none",
                   edgecolors=color, linewidths=1.5, zorder=4)

def plot_error_vs_loss(law, targets: Sequence[Target], path: Union[str, Path]) -> Path:
    """Average top-1 error vs loss with the fitted Eq. 5; targets at their chained prediction."""
    plt = _pyplot()
    if law.error_fit is None:
        raise ValueError("plot_error_vs_loss: the fit has no error law")
    pts = law.error_points
    L = np.array([p.loss for p in pts])
    E = np.array([p.error for p in pts])
    pred_L = [float(law.loss_fit.law(6 * t[0] * t[1], t[1] / t[0])) for t in targets]
    lo = min([L.min(), *pred_L, *(t[2] for t in targets if t[2] is not None)])
    hi = max([L.max(), *pred_L, *(t[2] for t in targets if t[2] is not None)])
    grid = np.linspace(lo - 0.1, hi + 0.1, 200)

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot(grid, law.error_fit.law(grid), color="tab:blue", label="Eq. 5 fit")
    ax.scatter(L, E, color="tab:blue", edgecolors="k", zorder=3, label="fitted runs")
    for (*_, meas_L, meas_E, label), pl, (marker, color) in zip(
        targets, pred_L, _target_styles(plt, targets), strict=True
    ):
        pe = float(law.error_fit.law(pl))
        text = f"{label}: pred {pe:.3f}" + (f", meas {meas_E:.3f}" if meas_E is not None else "")
        measured = (meas_L, meas_E) if meas_L is not None and meas_E is not None else None
        _target_markers(ax, (pl, pe), measured, marker, color, text)
    ax.set_xlabel(f"loss ({law.eval_set})")
    ax.set_ylabel(f"average top-1 error ({len(law.tasks)} tasks)")
    ax.set_title(
        f"Err(L) = ε − k·exp(−γL)   [{law.description}]\n"
        "filled: chained prediction, hollow: measured",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, plt, path)


def _save(fig, plt, path: Union[str, Path], dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
