"""``tinyllama-scaling``: plan the over-training testbed, fit L(C, M) and Err(L), predict, plot;
forecast a run's loss curve.

Subcommands:

* ``plan``: recipes (YAML JobConfigs) for shapes x token multipliers, with their compute.
* ``fit``: fit Eq. 4 (and Eq. 5 when downstream evals exist) on the testbed's paper protocol or on
  this stack's runs (``--runs``); ``--out fit.json`` keeps it for ``predict`` and ``plot``.
* ``predict``: loss and error of a model (default TinyLlama 1.1B on 3T tokens) under a fit, with
  a bootstrap interval and a warning when the request is outside what the fit has seen.
* ``reproduce``: the paper's check (Table 1 runs → held-out 1.4B and 6.9B runs) for RedPajama,
  C4 and RefinedWeb, with the relative errors the paper reports beside ours.
* ``plot``: loss vs compute per M and error vs loss, as PNG.
* ``forecast``, ``forecast-published``: the loss-curve forecast tool's subcommands
  (:mod:`megatron_tinyllama.scaling.forecast.cli`).

Errors in the input print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_tinyllama.scaling.fit import FitError, ScalingError, extrapolation_notes
from megatron_tinyllama.scaling.protocol import (
    PAPER_REPORTED,
    LawFit,
    bootstrap_law,
    check_targets,
    fit_laws,
    fit_testbed,
    load_fit,
    reproduce,
    save_fit,
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
    return fit_testbed(runs, args.dataset, args.eval_set or C4_EVAL,
                       args.tasks or list(PAPER_17_TASKS))


def error_tasks_of(runs: Sequence[RunPoint]) -> list[str]:
    """Tasks averaged for the runs' top-1 error when --tasks is not given.

    Runs evaluated by tinyllama-eval: the multiple-choice tasks all of them ran (in the first run's
    order), so every run's error is the mean over the same tasks. Testbed runs: the paper's 17.

    Raises:
        RunFileError: the runs mix both kinds, or share no task.
    """
    stack = [r for r in runs if r.error_tasks]
    if not stack:
        return list(PAPER_17_TASKS)
    if len(stack) != len(runs):
        raise RunFileError(
            "the runs mix tinyllama-eval results with testbed evaluations, which score different "
            "tasks; pass --tasks")
    common = [t for t in stack[0].error_tasks if all(t in r.error_tasks for r in stack)]
    if not common:
        raise RunFileError("the runs' tinyllama-eval results share no multiple-choice task")
    dropped = sorted({t for r in stack for t in r.error_tasks} - set(common))
    if dropped:
        print(f"note: task(s) {dropped} were not evaluated on every run; averaging over {common}")
    return common


def _eval_files(pairs: Sequence[str]) -> dict[str, str]:
    files = {}
    for pair in pairs:
        run, sep, path = pair.partition("=")
        if not sep or not run or not path:
            raise RunFileError(f"--eval {pair!r}: expected RUN_DIR=EVAL_JSON")
        files[run] = path
    return files


def _describe(law: LawFit) -> str:
    f, g = law.loss_fit, law.loss_fit.law
    (c_lo, c_hi), (m_lo, m_hi) = f.compute_range, f.multiplier_range
    lines = [
        f"fit: {law.description or 'runs'}; loss on {law.eval_set!r}",
        "  Eq. 4  L(C,M) = E + (a*M^eta + b*M^-eta)*C^-eta:  "
        f"E={g.E:.4f} a={g.a:.4g} b={g.b:.4g} eta={g.eta:.4f}",
        f"         {f.num_points} runs, rms residual {f.rms_residual:.4f}, "
        f"{f.converged_starts}/{f.total_starts} starts converged; "
        f"C in [{c_lo:.3g}, {c_hi:.3g}], M in [{m_lo:g}, {m_hi:g}]",
    ]
    if law.error_fit:
        e, h = law.error_fit, law.error_fit.law
        lines += [
            f"  Eq. 5  Err(L) = eps - k*exp(-gamma*L) ({len(law.tasks)}-task average top-1 "
            f"error): eps={h.epsilon:.4f} k={h.k:.4f} gamma={h.gamma:.4f}",
            f"         {e.num_points} runs, rms residual {e.rms_residual:.4f}; "
            f"L in [{e.loss_range[0]:.3f}, {e.loss_range[1]:.3f}]",
        ]
    return "\n".join(lines)


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.4f}%"


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4f}"


def cmd_reproduce(args) -> int:
    results = reproduce(find_testbed_dir(args.testbed_dir), args.datasets, args.tasks)
    cols = ("held-out run", "N", "M", "loss meas", "pred", "rel.err", "paper", "err meas", "pred")
    row = "  {:28s} {:>6s} {:>5s} | {:>9s} {:>7s} {:>8s} {:>5s} | {:>8s} {:>7s} {:>8s} {:>5s}"
    for ds, law, checks in results:
        print(f"\n=== train: {TESTBED_DATASETS.get(ds, ds)} ({ds}) ===")
        print(_describe(law))
        print(row.format(*cols, "rel.err", "paper"))
        for c in checks:
            paper = PAPER_REPORTED.get((ds, c.run.shape, round(c.run.multiplier)))
            paper_loss, paper_err = (f"{paper[0]}%", f"{paper[1]}%") if paper else ("", "")
            print(
                row.format(
                    c.run.name,
                    f"{c.run.params / 1e9:.2f}B",
                    f"{c.run.multiplier:g}",
                    _num(c.measured_loss),
                    _num(c.predicted_loss),
                    _pct(c.loss_relative_error),
                    paper_loss,
                    _num(c.measured_error),
                    _num(c.predicted_error),
                    _pct(c.error_relative_error),
                    paper_err,
                )
            )
            print(f"  {'':28s} beyond the fit: {'; '.join(c.notes) or 'no'}")
    return 0


def cmd_fit(args) -> int:
    if args.runs:
        runs = load_runs(args.runs, _eval_files(args.eval))
        eval_set = args.eval_set or (
            C4_EVAL if all(C4_EVAL in r.losses for r in runs) else STACK_EVAL
        )
        with_err = all(r.accuracies is not None for r in runs)
        law = fit_laws(
            runs,
            eval_set,
            runs if with_err else None,
            args.tasks or (error_tasks_of(runs) if with_err else list(PAPER_17_TASKS)),
            f"{len(runs)} runs given with --runs",
        )
        if not with_err:
            missing = [r.name for r in runs if r.accuracies is None]
            print(f"note: no downstream evaluations for run(s) {missing} (tinyllama-eval writes "
                  "eval_results.json into a run folder); fitting the loss law only")
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
    print(
        f"\nrequest: {who}, N={params:.4g} params, D={tokens:.4g} tokens, M={M:.4g}, "
        f"C=6ND={C:.4g} FLOPs"
    )
    boot = (
        bootstrap_law(law, [params], [tokens], args.bootstrap, args.confidence, args.seed)
        if args.bootstrap
        else None
    )

    def ci(interval) -> str:
        return f" ({100 * boot.confidence:g}% CI [{interval.low:.4f}, {interval.high:.4f}])"

    print(f"predicted loss ({law.eval_set}): {loss:.4f}{ci(boot.loss[0]) if boot else ''}")
    if law.error_fit:
        err = float(law.error_fit.law(loss))
        print(
            f"predicted {len(law.tasks)}-task average top-1 error: "
            f"{err:.4f}{ci(boot.error[0]) if boot else ''}"
        )
    if boot:
        print(
            f"bootstrap: {boot.replicates}/{boot.requested} resamples converged (seed {args.seed})"
        )
    sys.stdout.flush()  # keep the warnings after the numbers they qualify
    for note in extrapolation_notes(law.loss_fit, C, M, law.error_fit, loss):
        print(f"WARNING: outside the fitted range: {note}", file=sys.stderr)
    if law.description.startswith("testbed") and not str(who).startswith(("testbed-", "open_lm")):
        # The testbed's losses are per GPT-NeoX token on C4 eval; TinyLlama's tokenizer and data
        # differ, so its own loss is on another scale. The trend (how much over-training costs)
        # transfers better than the absolute number.
        print(
            "note: this law was fitted on open_lm models (GPT-NeoX tokenizer); for a model with "
            "another tokenizer or training data the absolute loss is indicative only - fit on "
            "your own runs (fit --runs) for numbers on your scale",
            file=sys.stderr,
        )
    return 0


def cmd_plan(args) -> int:
    from megatron_tinyllama.scaling.planner import (
        hyperparams_from_testbed,
        plan_summary,
        plan_testbed,
        save_plan,
        with_explicit,
    )

    runs: list[RunPoint] = []
    try:
        runs = load_testbed(find_testbed_dir(args.testbed_dir))
    except RunFileError as err:
        if args.testbed_dir:
            raise
        print(f"note: {err}; using explicit hyperparameters only", file=sys.stderr)
    explicit = dict(
        global_batch_size=args.global_batch_size,
        warmup_steps=args.warmup_steps,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        z_loss_weight=args.z_loss,
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
    recipes = plan_testbed(
        args.presets, args.multipliers, hps, overrides=args.override, save_root=args.save_root
    )
    summary = plan_summary(recipes, args.gpu_flops)
    if not recipes[0].config.data.blend:
        summary += (
            "\nnote: recipes leave data.blend empty; set it with --override data.blend=<prefix>"
        )
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
            targets.append(
                (c.run.params, c.run.tokens, c.measured_loss, c.measured_error, c.run.name)
            )
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
    from megatron_tinyllama.scaling.forecast.cli import add_commands as add_forecast_commands
    from megatron_tinyllama.scaling.planner import PAPER_MULTIPLIERS, TESTBED_PRESETS

    p = argparse.ArgumentParser(prog="tinyllama-scaling", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def testbed_opts(sp, fit_file: bool = True):
        sp.add_argument(
            "--testbed-dir",
            help="the testbed's exp_data folder (default: the released results shipped with "
            "the package)",
        )
        sp.add_argument(
            "--dataset",
            default="rpj",
            choices=sorted(TESTBED_DATASETS),
            help="testbed training set (default rpj)",
        )
        sp.add_argument(
            "--eval-set",
            help="loss set (default c4_val for the testbed, 'valid' for this stack's runs)",
        )
        sp.add_argument(
            "--tasks",
            nargs="+",
            default=None,
            help="tasks averaged for top-1 error (default: the paper's 17 for the testbed; for "
            "--runs of this stack, the multiple-choice tasks tinyllama-eval ran on every run)",
        )
        if fit_file:
            sp.add_argument(
                "--fit",
                type=Path,
                help="a fit written by 'fit --out' instead of fitting the testbed",
            )

    sp = sub.add_parser("plan", help="training recipes for shapes x token multipliers")
    sp.add_argument("--presets", nargs="+", default=list(TESTBED_PRESETS))
    sp.add_argument(
        "--multipliers",
        nargs="+",
        type=float,
        default=list(PAPER_MULTIPLIERS),
        help="token multipliers M = D/N",
    )
    sp.add_argument("--out-dir", help="write <recipe>.yaml and plan.txt here")
    sp.add_argument(
        "--save-root", default="runs", help="checkpoint.save_dir = <save-root>/<recipe>"
    )
    sp.add_argument(
        "--testbed-dir", help="the testbed's exp_data folder (default: the packaged copy)"
    )
    sp.add_argument("--global-batch-size", type=int)
    sp.add_argument("--warmup-steps", type=int)
    sp.add_argument("--lr", type=float)
    sp.add_argument("--min-lr", type=float)
    sp.add_argument("--weight-decay", type=float)
    sp.add_argument("--z-loss", type=float)
    sp.add_argument("--qk-norm", choices=["on", "off"])
    sp.add_argument(
        "--gpu-flops",
        type=float,
        help="sustained FLOP/s per GPU (peak x MFU) for a GPU-hours column",
    )
    sp.add_argument(
        "--override",
        nargs="*",
        default=[],
        help="section.field=value applied to every recipe (e.g. data.blend=...)",
    )
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("fit", help="fit Eq. 4 (and Eq. 5) on the testbed or on --runs")
    testbed_opts(sp, fit_file=False)
    sp.add_argument(
        "--runs",
        nargs="+",
        help="this stack's run folders (config.yaml + metrics.jsonl) or testbed model JSONs",
    )
    sp.add_argument(
        "--eval",
        nargs="*",
        default=[],
        metavar="RUN_DIR=EVAL_JSON",
        help="tinyllama-eval results kept outside a run folder (default: <run>/eval_results.json)",
    )
    sp.add_argument("--out", type=Path, help="write the fit as JSON")
    sp.set_defaults(func=cmd_fit)

    sp = sub.add_parser("predict", help="loss and error of a model under a fit")
    testbed_opts(sp)
    sp.add_argument(
        "--preset", default="tinyllama-1.1b", help="model preset giving N (default tinyllama-1.1b)"
    )
    sp.add_argument("--params", type=parse_count, help="N instead of a preset (e.g. 1.1B)")
    sp.add_argument("--tokens", type=parse_count, default=3e12, help="D (default 3T)")
    sp.add_argument("--multiplier", type=float, help="M = D/N instead of --tokens")
    sp.add_argument(
        "--bootstrap", type=int, default=300, help="bootstrap resamples for the interval (0: none)"
    )
    sp.add_argument("--confidence", type=float, default=0.95)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser(
        "reproduce", help="the paper's held-out check for RedPajama, C4, RefinedWeb"
    )
    sp.add_argument(
        "--testbed-dir", help="the testbed's exp_data folder (default: the packaged copy)"
    )
    sp.add_argument(
        "--datasets", nargs="+", default=list(TESTBED_DATASETS), choices=sorted(TESTBED_DATASETS)
    )
    sp.add_argument("--tasks", nargs="+", default=list(PAPER_17_TASKS))
    sp.set_defaults(func=cmd_reproduce)

    sp = sub.add_parser("plot", help="loss vs compute and error vs loss (PNG)")
    testbed_opts(sp)
    sp.add_argument(
        "--target",
        type=_target,
        nargs="*",
        default=[],
        help="extra PARAMS:TOKENS to predict, e.g. 1.1B:3T",
    )
    sp.add_argument("--out-dir", default="scaling_plots")
    sp.set_defaults(func=cmd_plot)

    add_forecast_commands(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tinyllama-scaling`` and ``tools/scaling_law.py``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ScalingError as err:
        print(f"tinyllama-scaling {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. an output folder that cannot be written
        print(f"tinyllama-scaling {args.command}: error: {err}", file=sys.stderr)
        return 2
