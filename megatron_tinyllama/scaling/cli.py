"""``tinyllama-scaling``: plan the over-training testbed, fit L(C, M) and Err(L), predict, plot.

Subcommands:

* ``plan``: recipes (YAML JobConfigs) for shapes x token multipliers, with their compute.
* ``fit``: fit Eq. 4 (and Eq. 5 when downstream evals exist) on the testbed's paper protocol or on
  this stack's runs (``--runs``); ``--out fit.json`` keeps it for ``predict`` and ``plot``.
* ``predict``: loss and error of a model (default TinyLlama 1.1B on 3T tokens) under a fit, with
  a bootstrap interval and a warning when the request is outside what the fit has seen.
* ``reproduce``: the paper's check (Table 1 runs → held-out 1.4B and 6.9B runs) for RedPajama,
  C4 and RefinedWeb, with the relative errors the paper reports beside ours.
* ``plot``: loss vs compute per M and error vs loss, as PNG.

Errors in the input print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from megatron_tinyllama.scaling.fit import (
    BootstrapResult,
    ErrorFit,
    ErrorLaw,
    FitError,
    LossFit,
    LossLaw,
    ScalingError,
    bootstrap_predictions,
    extrapolation_notes,
    fit_error_law,
    fit_loss_law,
    relative_error,
)
from megatron_tinyllama.scaling.runs import (
    C4_EVAL,
    PAPER_17_TASKS,
    PAPER_ERROR_EXTRA_RUNS,
    PAPER_LOSS_FIT_RUNS,
    STACK_EVAL,
    TESTBED_DATASETS,
    RunFileError,
    RunPoint,
    find_testbed_dir,
    held_out_runs,
    load_runs,
    load_testbed,
    select_runs,
)

# Relative errors (%) the paper reports for its held-out runs (RedPajama; C4-eval loss, 17-task
# top-1 error); printed beside ours by `reproduce`.
PAPER_REPORTED = {("rpj", "open_lm_1b", 640): (0.7, 3.6), ("rpj", "open_lm_7b", 20): (0.7, 0.05)}


@dataclass(frozen=True)
class FitPoint:
    """A run as the fits saw it."""

    name: str
    params: float
    tokens: float
    loss: float
    error: Optional[float] = None


@dataclass(frozen=True)
class LawFit:
    """Eq. 4 (and optionally Eq. 5) with the points each was fitted on."""

    loss_fit: LossFit
    loss_points: tuple[FitPoint, ...]
    eval_set: str
    error_fit: Optional[ErrorFit] = None
    error_points: tuple[FitPoint, ...] = ()
    tasks: tuple[str, ...] = ()
    description: str = ""


def fit_laws(
    loss_runs: Sequence[RunPoint],
    eval_set: str,
    error_runs: Optional[Sequence[RunPoint]] = None,
    tasks: Sequence[str] = PAPER_17_TASKS,
    description: str = "",
) -> LawFit:
    """Fit Eq. 4 on ``loss_runs`` and, when given, Eq. 5 on ``error_runs`` (loss → average error)."""
    lp = tuple(FitPoint(r.name, r.params, r.tokens, r.loss(eval_set)) for r in loss_runs)
    loss_fit = fit_loss_law([6 * p.params * p.tokens for p in lp], [p.tokens / p.params for p in lp], [p.loss for p in lp])
    if not error_runs:
        return LawFit(loss_fit, lp, eval_set, description=description)
    ep = tuple(FitPoint(r.name, r.params, r.tokens, r.loss(eval_set), r.average_error(tasks)) for r in error_runs)
    error_fit = fit_error_law([p.loss for p in ep], [p.error for p in ep])
    return LawFit(loss_fit, lp, eval_set, error_fit, ep, tuple(tasks), description)


def fit_testbed(runs: Sequence[RunPoint], dataset: str, eval_set: str = C4_EVAL, tasks: Sequence[str] = PAPER_17_TASKS) -> LawFit:
    """The paper's default fits for one training set: Table 1 runs for the loss law, plus 1.4B M=20 for the error law."""
    loss_runs = select_runs(runs, dataset, PAPER_LOSS_FIT_RUNS)
    error_runs = loss_runs + select_runs(runs, dataset, PAPER_ERROR_EXTRA_RUNS)
    name = TESTBED_DATASETS.get(dataset, dataset)
    return fit_laws(loss_runs, eval_set, error_runs, tasks, f"testbed {name} ({dataset}), paper Table 1 runs")


@dataclass(frozen=True)
class TargetCheck:
    """Prediction for a run the fits did not see, against its measurement."""

    run: RunPoint
    predicted_loss: float
    measured_loss: float
    loss_relative_error: float
    predicted_error: Optional[float]
    measured_error: Optional[float]
    error_relative_error: Optional[float]
    notes: tuple[str, ...]


def check_targets(law: LawFit, runs: Sequence[RunPoint]) -> list[TargetCheck]:
    """Chained predictions (C, M) → L → Err for ``runs`` and their relative errors."""
    checks = []
    for r in runs:
        pred_loss = float(law.loss_fit.law(r.compute, r.multiplier))
        meas_loss = r.loss(law.eval_set)
        pred_err = meas_err = rel_err = None
        if law.error_fit is not None and r.accuracies is not None:
            pred_err = float(law.error_fit.law(pred_loss))
            meas_err = r.average_error(law.tasks)
            rel_err = float(relative_error(pred_err, meas_err))
        notes = extrapolation_notes(law.loss_fit, r.compute, r.multiplier, law.error_fit, pred_loss)
        checks.append(
            TargetCheck(r, pred_loss, meas_loss, float(relative_error(pred_loss, meas_loss)), pred_err, meas_err, rel_err, tuple(notes))
        )
    return checks


def reproduce(testbed_dir: Path, datasets: Sequence[str] = tuple(TESTBED_DATASETS), tasks: Sequence[str] = PAPER_17_TASKS):
    """Fit each training set's laws on the paper's runs and check them on its 1.4B and 6.9B runs.

    Returns:
        ``[(dataset, LawFit, [TargetCheck, ...]), ...]``.
    """
    runs = load_testbed(testbed_dir, datasets)
    out = []
    for ds in datasets:
        law = fit_testbed(runs, ds, C4_EVAL, tasks)
        used = select_runs(runs, ds, PAPER_LOSS_FIT_RUNS + PAPER_ERROR_EXTRA_RUNS)
        out.append((ds, law, check_targets(law, held_out_runs(runs, ds, used))))
    return out


# ---------------------------------------------------------------------------------------------
# Fit files (JSON) so that predict/plot can reuse a fit.


def save_fit(law: LawFit, path: Path) -> None:
    """Write a fit, its ranges and its points as JSON."""
    payload = {
        "description": law.description,
        "eval_set": law.eval_set,
        "loss_fit": asdict(law.loss_fit),
        "loss_points": [asdict(p) for p in law.loss_points],
        "error_fit": asdict(law.error_fit) if law.error_fit else None,
        "error_points": [asdict(p) for p in law.error_points],
        "tasks": list(law.tasks),
    }
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def load_fit(path: Path) -> LawFit:
    """Read a fit written by :func:`save_fit`; a missing field is a :class:`RunFileError`."""
    try:
        d = json.loads(Path(path).read_text())
        lf = d["loss_fit"]
        loss_fit = LossFit(**{**lf, "law": LossLaw(**lf["law"]), "compute_range": tuple(lf["compute_range"]), "multiplier_range": tuple(lf["multiplier_range"])})
        ef = d["error_fit"]
        error_fit = ErrorFit(**{**ef, "law": ErrorLaw(**ef["law"]), "loss_range": tuple(ef["loss_range"])}) if ef else None
        return LawFit(
            loss_fit,
            tuple(FitPoint(**p) for p in d["loss_points"]),
            d["eval_set"],
            error_fit,
            tuple(FitPoint(**p) for p in d["error_points"]),
            tuple(d["tasks"]),
            d.get("description", ""),
        )
    except OSError as err:
        raise RunFileError(f"{path}: cannot read fit ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise RunFileError(f"{path}: not valid JSON ({err})") from None
    except (KeyError, TypeError) as err:
        raise RunFileError(f"{path}: not a fit file written by 'tinyllama-scaling fit' (field {err})") from None


def bootstrap_law(law: LawFit, params: Sequence[float], tokens: Sequence[float], replicates: int, confidence: float, seed: int) -> BootstrapResult:
    """Bootstrap intervals of the chained prediction for (params, tokens) targets under ``law``."""
    lp = law.loss_points
    loss_points = ([6 * p.params * p.tokens for p in lp], [p.tokens / p.params for p in lp], [p.loss for p in lp])
    error_points = ([p.loss for p in law.error_points], [p.error for p in law.error_points]) if law.error_fit else None
    targets = ([6 * n * d for n, d in zip(params, tokens)], [d / n for n, d in zip(params, tokens)])
    return bootstrap_predictions(
        loss_points, targets, error_points=error_points, loss_fit=law.loss_fit, error_fit=law.error_fit,
        replicates=replicates, confidence=confidence, seed=seed,
    )


# ---------------------------------------------------------------------------------------------
# Command line.

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str) -> float:
    """'3T' → 3e12, '1.1B' → 1.1e9, '2.5e9' → 2.5e9."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([kmbgtKMBGT]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 3T, 1.1B, 2.5e9)")
    value = float(m[1]) * _SUFFIX.get(m[2].lower(), 1.0)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _law_from_args(args) -> LawFit:
    if getattr(args, "fit", None):
        return load_fit(args.fit)
    runs = load_testbed(find_testbed_dir(args.testbed_dir), [args.dataset])
    return fit_testbed(runs, args.dataset, args.eval_set or C4_EVAL, args.tasks)


def _describe(law: LawFit) -> str:
    f, g = law.loss_fit, law.loss_fit.law
    lines = [
        f"fit: {law.description or 'runs'}; loss on {law.eval_set!r}",
        f"  Eq. 4  L(C,M) = E + (a*M^eta + b*M^-eta)*C^-eta:  E={g.E:.4f} a={g.a:.4g} b={g.b:.4g} eta={g.eta:.4f}",
        f"         {f.num_points} runs, rms residual {f.rms_residual:.4f}, {f.converged_starts}/{f.total_starts} starts converged; "
        f"C in [{f.compute_range[0]:.3g}, {f.compute_range[1]:.3g}], M in [{f.multiplier_range[0]:g}, {f.multiplier_range[1]:g}]",
    ]
    if law.error_fit:
        e, h = law.error_fit, law.error_fit.law
        lines += [
            f"  Eq. 5  Err(L) = eps - k*exp(-gamma*L) ({len(law.tasks)}-task average top-1 error): eps={h.epsilon:.4f} k={h.k:.4f} gamma={h.gamma:.4f}",
            f"         {e.num_points} runs, rms residual {e.rms_residual:.4f}; L in [{e.loss_range[0]:.3f}, {e.loss_range[1]:.3f}]",
        ]
    return "\n".join(lines)


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.4f}%"


def cmd_reproduce(args) -> int:
    results = reproduce(find_testbed_dir(args.testbed_dir), args.datasets, args.tasks)
    for ds, law, checks in results:
        print(f"\n=== train: {TESTBED_DATASETS.get(ds, ds)} ({ds}) ===")
        print(_describe(law))
        head = f"  {'held-out run':28s} {'N':>6s} {'M':>5s} | {'loss meas':>9s} {'pred':>7s} {'rel.err':>8s} {'paper':>5s} | {'err meas':>8s} {'pred':>7s} {'rel.err':>8s} {'paper':>5s}"
        print(head)
        for c in checks:
            paper = PAPER_REPORTED.get((ds, c.run.shape, round(c.run.multiplier)))
            pl, pe = (f"{paper[0]}%", f"{paper[1]}%") if paper else ("", "")
            me = "-" if c.measured_error is None else f"{c.measured_error:.4f}"
            pr = "-" if c.predicted_error is None else f"{c.predicted_error:.4f}"
            print(
                f"  {c.run.name:28s} {c.run.params / 1e9:5.2f}B {c.run.multiplier:5g} | {c.measured_loss:9.4f} {c.predicted_loss:7.4f} "
                f"{_pct(c.loss_relative_error):>8s} {pl:>5s} | {me:>8s} {pr:>7s} {_pct(c.error_relative_error):>8s} {pe:>5s}"
            )
            print(f"  {'':28s} beyond the fit: {'; '.join(c.notes) or 'no'}")
    return 0


def cmd_fit(args) -> int:
    if args.runs:
        runs = load_runs(args.runs)
        eval_set = args.eval_set or (C4_EVAL if all(C4_EVAL in r.losses for r in runs) else STACK_EVAL)
        with_err = all(r.accuracies is not None for r in runs)
        law = fit_laws(runs, eval_set, runs if with_err else None, args.tasks, f"{len(runs)} runs given with --runs")
        if not with_err:
            print("note: no downstream evaluations for these runs; fitting the loss law only")
    else:
        law = _law_from_args(args)
    print(_describe(law))
    if args.out:
        save_fit(law, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_predict(args) -> int:
    from megatron_tinyllama.config import ConfigError
    from megatron_tinyllama.model.presets import get_preset

    law = _law_from_args(args)
    if args.params is not None:
        params, who = args.params, "model given by --params"
    else:
        try:
            params, who = float(get_preset(args.preset).num_parameters()), args.preset
        except ConfigError as err:
            raise RunFileError(str(err)) from None
    tokens = args.tokens if args.multiplier is None else args.multiplier * params
    C, M = 6 * params * tokens, tokens / params
    loss = float(law.loss_fit.law(C, M))
    if not math.isfinite(loss):
        raise FitError(f"the fit gives a non-finite loss at C={C:.3g}, M={M:.4g}")
    print(_describe(law))
    print(f"\nrequest: {who}, N={params:.4g} params, D={tokens:.4g} tokens, M={M:.4g}, C=6ND={C:.4g} FLOPs")
    boot = bootstrap_law(law, [params], [tokens], args.bootstrap, args.confidence, args.seed) if args.bootstrap else None
    ci = lambda iv: f" ({100 * boot.confidence:g}% CI [{iv.low:.4f}, {iv.high:.4f}])" if boot else ""  # noqa: E731
    print(f"predicted loss ({law.eval_set}): {loss:.4f}{ci(boot.loss[0]) if boot else ''}")
    if law.error_fit:
        err = float(law.error_fit.law(loss))
        print(f"predicted {len(law.tasks)}-task average top-1 error: {err:.4f}{ci(boot.error[0]) if boot else ''}")
    if boot:
        print(f"bootstrap: {boot.replicates}/{boot.requested} resamples converged (seed {args.seed})")
    for note in extrapolation_notes(law.loss_fit, C, M, law.error_fit, loss):
        print(f"WARNING: outside the fitted range: {note}", file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    from megatron_tinyllama.scaling.planner import hyperparams_from_testbed, plan_summary, plan_testbed, save_plan, with_explicit

    runs: list[RunPoint] = []
    try:
        runs = load_testbed(find_testbed_dir(args.testbed_dir))
    except RunFileError as err:
        if args.testbed_dir:
            raise
        print(f"note: {err}; using explicit hyperparameters only", file=sys.stderr)
    explicit = dict(
        global_batch_size=args.global_batch_size, warmup_steps=args.warmup_steps, lr=args.lr, min_lr=args.min_lr,
        weight_decay=args.weight_decay, z_loss_weight=args.z_loss,
        qk_layernorm=None if args.qk_norm is None else args.qk_norm == "on",
    )
    hps = {}
    for preset in args.presets:
        try:
            base = hyperparams_from_testbed(runs, preset)
        except ScalingError:
            base = None
        try:
            hps[preset] = with_explicit(base, **explicit)
        except ScalingError as err:
            raise type(err)(f"preset {preset!r}: {err}") from None
    recipes = plan_testbed(args.presets, args.multipliers, hps, overrides=args.override, save_root=args.save_root)
    summary = plan_summary(recipes, args.gpu_flops)
    if not recipes[0].config.data.blend:
        summary += "\nnote: recipes leave data.blend empty; set it with --override data.blend=<prefix>"
    print(summary)
    if args.out_dir:
        written = save_plan(recipes, args.out_dir, summary)
        print(f"wrote {len(written)} recipes and plan.txt to {args.out_dir}")
    return 0


def cmd_plot(args) -> int:
    from megatron_tinyllama.scaling.plots import plot_error_vs_loss, plot_loss_vs_compute

    law = _law_from_args(args)
    targets = [(float(n), float(d), None, None, f"N={n:.3g}, D={d:.3g}") for n, d in args.target]
    if not args.fit:
        runs = load_testbed(find_testbed_dir(args.testbed_dir), [args.dataset])
        used = select_runs(runs, args.dataset, PAPER_LOSS_FIT_RUNS + PAPER_ERROR_EXTRA_RUNS)
        for c in check_targets(law, held_out_runs(runs, args.dataset, used)):
            targets.append((c.run.params, c.run.tokens, c.measured_loss, c.measured_error, c.run.name))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_loss_vs_compute(law, targets, out / "loss_vs_compute.png")]
    if law.error_fit:
        paths.append(plot_error_vs_loss(law, targets, out / "error_vs_loss.png"))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _target(text: str) -> tuple[float, float]:
    n, sep, d = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected PARAMS:TOKENS (e.g. 1.1B:3T), got {text!r}")
    return parse_count(n), parse_count(d)


def build_parser() -> argparse.ArgumentParser:
    from megatron_tinyllama.scaling.planner import PAPER_MULTIPLIERS, TESTBED_PRESETS

    p = argparse.ArgumentParser(prog="tinyllama-scaling", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def testbed_opts(sp, fit_file: bool = True):
        sp.add_argument("--testbed-dir", help="the testbed's exp_data folder (default: ../shared/scaling_testbed/exp_data from the repo or cwd)")
        sp.add_argument("--dataset", default="rpj", choices=sorted(TESTBED_DATASETS), help="testbed training set (default rpj)")
        sp.add_argument("--eval-set", help="loss set (default c4_val for the testbed, 'valid' for this stack's runs)")
        sp.add_argument("--tasks", nargs="+", default=list(PAPER_17_TASKS), help="tasks averaged for top-1 error (default: the paper's 17)")
        if fit_file:
            sp.add_argument("--fit", type=Path, help="a fit written by 'fit --out' instead of fitting the testbed")

    sp = sub.add_parser("plan", help="training recipes for shapes x token multipliers")
    sp.add_argument("--presets", nargs="+", default=list(TESTBED_PRESETS))
    sp.add_argument("--multipliers", nargs="+", type=float, default=list(PAPER_MULTIPLIERS), help="token multipliers M = D/N")
    sp.add_argument("--out-dir", help="write <recipe>.yaml and plan.txt here")
    sp.add_argument("--save-root", default="runs", help="checkpoint.save_dir = <save-root>/<recipe>")
    sp.add_argument("--testbed-dir")
    sp.add_argument("--global-batch-size", type=int)
    sp.add_argument("--warmup-steps", type=int)
    sp.add_argument("--lr", type=float)
    sp.add_argument("--min-lr", type=float)
    sp.add_argument("--weight-decay", type=float)
    sp.add_argument("--z-loss", type=float)
    sp.add_argument("--qk-norm", choices=["on", "off"])
    sp.add_argument("--gpu-flops", type=float, help="sustained FLOP/s per GPU (peak x MFU) for a GPU-hours column")
    sp.add_argument("--override", nargs="*", default=[], help="section.field=value applied to every recipe (e.g. data.blend=...)")
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("fit", help="fit Eq. 4 (and Eq. 5) on the testbed or on --runs")
    testbed_opts(sp, fit_file=False)
    sp.add_argument("--runs", nargs="+", help="this stack's run folders (config.yaml + metrics.jsonl) or testbed model JSONs")
    sp.add_argument("--out", type=Path, help="write the fit as JSON")
    sp.set_defaults(func=cmd_fit)

    sp = sub.add_parser("predict", help="loss and error of a model under a fit")
    testbed_opts(sp)
    sp.add_argument("--preset", default="tinyllama-1.1b", help="model preset giving N (default tinyllama-1.1b)")
    sp.add_argument("--params", type=parse_count, help="N instead of a preset (e.g. 1.1B)")
    sp.add_argument("--tokens", type=parse_count, default=3e12, help="D (default 3T)")
    sp.add_argument("--multiplier", type=float, help="M = D/N instead of --tokens")
    sp.add_argument("--bootstrap", type=int, default=300, help="bootstrap resamples for the interval (0: none)")
    sp.add_argument("--confidence", type=float, default=0.95)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser("reproduce", help="the paper's held-out check for RedPajama, C4, RefinedWeb")
    sp.add_argument("--testbed-dir")
    sp.add_argument("--datasets", nargs="+", default=list(TESTBED_DATASETS), choices=sorted(TESTBED_DATASETS))
    sp.add_argument("--tasks", nargs="+", default=list(PAPER_17_TASKS))
    sp.set_defaults(func=cmd_reproduce)

    sp = sub.add_parser("plot", help="loss vs compute and error vs loss (PNG)")
    testbed_opts(sp)
    sp.add_argument("--target", type=_target, nargs="*", default=[], help="extra PARAMS:TOKENS to predict, e.g. 1.1B:3T")
    sp.add_argument("--out-dir", default="scaling_plots")
    sp.set_defaults(func=cmd_plot)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tinyllama-scaling`` and ``tools/scaling_law.py``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ScalingError as err:
        print(f"tinyllama-scaling {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. an output folder that cannot be written
        print(f"tinyllama-scaling {args.command}: error: {err}", file=sys.stderr)
        return 2
