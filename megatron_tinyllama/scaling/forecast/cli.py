"""The ``forecast`` and ``forecast-published`` subcommands of ``tinyllama-scaling`` (the entry
point, :mod:`megatron_tinyllama.scaling.cli`, adds them with :func:`add_commands`):

* ``forecast``: the whole loss curve of a run (and of the stages after it) from its metrics so far,
  by the curve law of Tissue et al. (2024), with a band and caveats; ``--plan`` forecasts a bigger
  run's curve from small runs with L(C, M).
* ``forecast-published``: the forecast's checks on the loss curves released with the multi-power
  law paper (25M-400M models, nine schedules; shipped with the package): one cosine run fitted,
  the other schedules and the last 70% of each cosine run predicted; ``--live-every`` replays
  every run through the trainer's live check.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from megatron_tinyllama.scaling.errors import RunFileError


def cmd_forecast_published(args) -> int:
    import json

    from megatron_tinyllama.scaling.forecast.predict import BURN_IN_WARMUPS, check_burn_in
    from megatron_tinyllama.scaling.forecast.published import CURVES_DIR, FIT_ON, check_size

    burn = BURN_IN_WARMUPS if args.burn_in_warmups is None else check_burn_in(
        args.burn_in_warmups, "--burn-in-warmups")
    results = [check_size(size, burn_in_warmups=burn, decay=args.decay,
                          curves_dir=args.curves_dir or CURVES_DIR) for size in args.sizes]
    print(f"curve law fitted on {FIT_ON} (points from {burn:g} warm-ups of 2160 steps, "
          f"lambda {args.decay}); relative error of the prediction, mean / at the last point:")
    names = list(results[0]["predict"])
    print(f"  {'schedule':20s}" + "".join(f"{r['size']:>18s}" for r in results))
    for name in names:
        print(f"  {name:20s}" + "".join(
            f"{100 * r['predict'][name]['mean']:>9.2f}% /{100 * r['predict'][name]['last']:>5.2f}%"
            for r in results))
    print("first 30% of a cosine run -> its last point (error; burn-in spread; caveats):")
    for name in results[0]["first30"]:
        cells = []
        for r in results:
            c = r["first30"][name]
            if "error" in c:
                cells.append(f"{r['size']} {c['error']}")
                continue
            caveats = ",".join(c["caveats"]) or "-"
            cells.append(f"{r['size']} {100 * c['end_error']:.2f}%; "
                         f"{100 * (c['burn_in_spread'] or 0):.1f}%; {caveats}")
        print(f"  {name:20s} " + " | ".join(cells))
    if args.live_every:
        _print_live_replay(args, burn, results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def _print_live_replay(args, burn: float, results: list) -> None:
    """Every published run replayed through the trainer's live check (``--live-every``), with
    the totals by model size and by schedule length (the band's terms are not tuned per split,
    so each split's number is its own)."""
    from megatron_tinyllama.scaling.forecast.published import (
        CURVES_DIR,
        SCHEDULES,
        live_totals,
        replay_live,
    )

    if args.live_every < 1:
        raise RunFileError(f"--live-every must be >= 1, got {args.live_every}")
    print(f"live check replayed (one check in {args.live_every}; burn-in {burn:g} warm-ups): "
          "final band holds the end / checks; >2% off without a caveat; false alarms")
    reps = []
    for r in results:
        size = r["size"].rstrip("M")
        r["live"] = []
        for name in SCHEDULES:
            rep = replay_live(size, name, every=args.live_every, burn_in_warmups=burn,
                              curves_dir=args.curves_dir or CURVES_DIR)
            r["live"].append(rep)
            reps.append(rep)
            print(f"  {r['size']:>5s} {name:20s} {rep['inside']:4d} / {rep['checks']:4d}; "
                  f"{rep['off_2pct_no_caveat']:3d} of {rep['off_2pct']:3d} off; "
                  f"{rep['warned']} alarms")

    def line(label: str, total: dict) -> str:
        checks = max(total["checks"], 1)
        widths = ("" if total["width_median"] is None else
                  f"; band width median {100 * total['width_median']:.2f}%, 90th percentile "
                  f"{100 * total['width_p90']:.2f}% of the forecast")
        return (f"  {label}: end inside the {100 * 0.95:g}% band in {total['inside']} of "
                f"{total['checks']} checks ({100 * total['inside_share']:.1f}%); more than 2% off "
                f"without a caveat in {total['off_2pct_no_caveat']} of {total['checks']} "
                f"({100 * total['off_2pct_no_caveat'] / checks:.1f}%; {total['off_2pct']} off in "
                f"all); within 2% but with a caveat {total['within_2pct_caveat']}; false alarms "
                f"{total['warned']}{widths}")

    print(line("all", live_totals(reps)))
    for size in sorted({rep["size"] for rep in reps}, key=lambda s: float(s.rstrip("M"))):
        print(line(size, live_totals([rep for rep in reps if rep["size"] == size])))
    for steps in sorted({rep["steps"] for rep in reps}):
        print(line(f"{steps}-step runs", live_totals([rep for rep in reps
                                                      if rep["steps"] == steps])))


def _forecast_table(data: dict, measured: dict[int, float]) -> str:
    """Rows of a forecast: up to 8 measured steps, 6 steps after the last, stage starts, the end."""
    curve = data["curve"]
    starts = {st["first_step"] for st in data.get("stages", [])}
    seen = [i for i, c in enumerate(curve) if c["step"] in measured]
    later = [i for i, c in enumerate(curve) if not seen or i > seen[-1]]

    def spread(items: list[int], k: int) -> set[int]:
        return {items[j] for j in np.unique(np.linspace(0, len(items) - 1, k).round().astype(int))} \
            if items else set()

    picks = spread(seen, 8) | spread(later, 6 if seen else 12) | {len(curve) - 1}
    picks |= {i for i, c in enumerate(curve) if c["step"] in starts and c["step"] != 1}
    lines = [f"  {'step':>9s} {'tokens':>15s} {'measured':>9s} {'forecast':>9s}  band"]
    for i in sorted(picks):
        c = curve[i]
        meas = f"{measured[c['step']]:.4f}" if c["step"] in measured else "-"
        mark = "  <- stage start" if c["step"] in starts and c["step"] != 1 else ""
        lines.append(f"  {c['step']:>9d} {c['tokens']:>15,d} {meas:>9s} {c['loss']:>9.4f}  "
                     f"[{c['low']:.4f}, {c['high']:.4f}]{mark}")
    return "\n".join(lines)


def cmd_forecast(args) -> int:
    import json

    from megatron_tinyllama.scaling.forecast.plan import forecast_plan
    from megatron_tinyllama.scaling.forecast.predict import (
        check_burn_in,
        forecast_run,
        relative_errors,
    )

    opts = dict(decay=args.decay, replicates=args.bootstrap, confidence=args.confidence,
                seed=args.seed)
    if args.plan and args.batch_exponent != 1.0:
        raise RunFileError("forecast --plan: --batch-exponent applies to a run's own forecast only")
    if args.plan and args.burn_in_warmups is not None:
        raise RunFileError("forecast --plan: --burn-in-warmups applies to a run's own forecast "
                           "only")
    if not args.plan:
        opts["batch_exponent"] = args.batch_exponent
        if args.burn_in_warmups is not None:
            opts["burn_in_warmups"] = check_burn_in(args.burn_in_warmups, "--burn-in-warmups")
    measured, fitted_until = None, None
    if args.plan:
        if not args.runs:
            raise RunFileError("forecast --plan: give the small runs with --runs")
        plan = forecast_plan(args.runs, args.recipe, **opts)
        data = plan.to_json()
        g = plan.law_fit.loss_fit.law
        print(f"L(C,M) on {len(args.runs)} runs: E={g.E:.4f} a={g.a:.4g} b={g.b:.4g} "
              f"eta={g.eta:.4f}; curve shape from {plan.shape_run}")
        print(f"planned run: N={plan.params:,} params, D={plan.tokens:,} tokens "
              f"(M={plan.tokens / plan.params:.3g})")
        table_measured: dict[int, float] = {}
    else:
        if not args.run_dir:
            raise RunFileError("forecast: give RUN_DIR (or --plan with --runs)")
        fc = forecast_run(args.run_dir, args.recipe, also_fit=args.also_fit,
                          fit_until_step=args.fit_until_step, **opts)
        data = fc.to_json()
        law = fc.fit.law
        for warning in fc.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for note in fc.notes:
            print(f"note: {note}")
        others = "".join(f" + {n} of {run}" for run, n in fc.also_fit)
        source = f" ({fc.fitted_tokens.size} of this run{others})" if others else ""
        print(f"curve law L = L0 + A*S1^-alpha - C*S2 on {fc.fit.num_points} {fc.loss_kind} "
              f"points{source}: L0={law.L0:.4f} A={law.A:.4g} alpha={law.alpha:.4f} C={law.C:.4g} "
              f"(lambda={fc.decay}, rms residual {fc.fit.rms_residual:.4f})")
        measured = (fc.measured_tokens, fc.measured_loss)
        fitted_until = float(fc.fitted_tokens.max())
        table_measured = {int(s): float(v) for s, v in zip(fc.measured_steps, fc.measured_loss)}
        if args.fit_until_step is not None and (fc.measured_tokens > fitted_until).any():
            err = relative_errors(fc, fc.measured_tokens, fc.measured_loss, fitted_until)
            data["check"] = err
            print(f"against the {err['points']} later measured points: relative error mean "
                  f"{100 * err['mean']:.2f}%, max {100 * err['max']:.2f}%, last "
                  f"{100 * err['last']:.2f}%")
    print(_forecast_table(data, table_measured))
    print(f"forecast final loss {data['final_loss']:.4f}, {100 * data['confidence']:g}% band "
          f"[{data['band'][0]:.4f}, {data['band'][1]:.4f}] at step {data['curve'][-1]['step']:,}")
    for caveat in data.get("caveats", []):
        print(f"caveat: {caveat}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.png:
        from megatron_tinyllama.scaling.forecast.plots import plot_forecast

        plot_forecast(data, args.png, measured=measured, fitted_until_tokens=fitted_until)
        print(f"wrote {args.png}")
    return 0


def add_commands(sub) -> None:
    """Add ``forecast`` and ``forecast-published`` to the ``tinyllama-scaling`` subparsers."""
    sp = sub.add_parser("forecast", help="the whole loss curve of a run, with a band")
    sp.add_argument("run_dir", nargs="?", help="the run's save_dir (config.yaml + metrics.jsonl)")
    sp.add_argument("--recipe", nargs="*", default=[], type=Path,
                    help="recipes of the stages that follow, in order (with --plan: the planned "
                    "run's stages)")
    sp.add_argument("--fit-until-step", type=int, help="fit only the records up to this step")
    sp.add_argument("--also-fit", nargs="*", default=[], type=Path, metavar="RUN_DIR",
                    help="other runs fitted together with RUN_DIR, each over its own schedule (a "
                    "second schedule pins the law better than one curve)")
    sp.add_argument("--out", type=Path, help="write the forecast as JSON")
    sp.add_argument("--png", type=Path, help="plot the forecast")
    sp.add_argument("--plan", action="store_true",
                    help="forecast a planned run (--recipe) from small finished runs (--runs)")
    sp.add_argument("--runs", nargs="*", default=[], help="with --plan: the small runs' folders")
    sp.add_argument("--decay", type=float, default=0.999,
                    help="lambda of the annealing area, per step of the first stage's batch")
    sp.add_argument("--batch-exponent", type=float, default=1.0,
                    help="a step of k times the first stage's batch counts as k^this steps: 1 per "
                    "token (default), 0.5 Adam's square-root rule (docs/forecast.md)")
    sp.add_argument("--burn-in-warmups", type=float, default=None,
                    help="points before this many warm-ups (in steps) are not fitted (default 5, "
                    "set for tiny runs with a few warm-up steps; 1-2 for a run whose warm-up is "
                    "a large share of it, docs/forecast.md)")
    sp.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the band")
    sp.add_argument("--confidence", type=float, default=0.95)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_forecast)

    sp = sub.add_parser("forecast-published",
                        help="the curve forecast checked on published 25M-400M runs")
    sp.add_argument("--sizes", nargs="+", default=["25", "100", "400"],
                    choices=["25", "100", "400"], help="model sizes, millions of parameters")
    sp.add_argument("--burn-in-warmups", type=float, default=None,
                    help="points before this many warm-ups are not fitted (default: the "
                    "forecast's, 5)")
    sp.add_argument("--decay", type=float, default=0.999, help="lambda of the annealing area")
    sp.add_argument("--curves-dir", type=Path,
                    help="the release's loss_curve_repo folder (default: the packaged copy)")
    sp.add_argument("--live-every", type=int, default=0, metavar="N",
                    help="also replay every run through the trainer's live check, checking one "
                    "point in N (1: all, about 4,200 checks, ~4 minutes on a core): how often the "
                    "final band held the run's end, and the forecasts more than 2%% off without "
                    "a caveat")
    sp.add_argument("--out", type=Path, help="write the checks as JSON")
    sp.set_defaults(func=cmd_forecast_published)
