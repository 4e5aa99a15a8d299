"""Is the forecast benchmark's miss a property of its one setup? The same checks under other tiny
CPU setups (docs/forecast.md, "Other setups"): a cosine run and a constant + linear cooldown run
per setup and seed, through this stack's real training entry, on the same fresh code tokens as
``bench_forecast.py``.

Setups (2-layer models keep 4 heads in 2 KV groups, 4-layer ones 8 heads in 2):

* ``A``: ``bench_forecast.py``'s own (hidden 64, 2 layers, LR 8e-3, 4 warm-up steps, 128 steps).
* ``B``: the same model at half the LR, twice the warm-up, twice the steps.
* ``C``: hidden 128, 4 layers (4x the non-embedding parameters), at B's recipe.
* ``D``: A at twice the batch (8192 tokens a step: half the gradient noise).

Seeds 11 and 12, none of ``bench_forecast.py``'s, so nothing here was chosen on them. Per run:
the law fitted on the cosine run (burn-in 5 warm-ups, lambda 0.999) against the constant +
cooldown run (mean error, and the signed error at its end), the law fitted on both runs at once
(can it describe them?), and the first 30% of the cosine run forecasting its end, with the
forecast's burn-in spread (how far the end moves with the burn-in halved or raised by half); and
the cosine run's evaluations replayed through the live check (forecasts of the end off by more
than 2%, and which carried a caveat).

    python benchmarks/bench_forecast_regimes.py --work-dir /tmp/bench_forecast_regimes

About 13 minutes of training on 2 cores (C: 7 of them), 16 with the runs' start-ups; runs
in the work dir are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_forecast as bench  # noqa: E402  (the recipes, the trainer call, the corpus bound)

SETUPS = {
    "A": {"hidden": 64, "layers": 2, "lr": 8e-3, "warmup_steps": 4, "steps": 128, "batch_seqs": 32},
    "B": {"hidden": 64, "layers": 2, "lr": 4e-3, "warmup_steps": 8, "steps": 256, "batch_seqs": 32},
    "C": {"hidden": 128, "layers": 4, "lr": 4e-3, "warmup_steps": 8, "steps": 256,
          "batch_seqs": 32},
    "D": {"hidden": 64, "layers": 2, "lr": 8e-3, "warmup_steps": 4, "steps": 128, "batch_seqs": 64},
}
SEEDS = (11, 12)


def train_setup(work: Path, corpus: Path, name: str, seed: int) -> dict:
    """The cosine and the constant + cooldown runs of one setup at one seed (their folders)."""
    c = SETUPS[name]
    batch = bench.SEQ * c["batch_seqs"]
    total = c["steps"] * batch
    bench.BATCH_SEQS = c["batch_seqs"]  # the recipe's micro-batch: one per step
    stable = int(0.8 * total) // batch * batch

    def go(run: str, **kw) -> Path:
        cfg = bench.recipe(f"{name}_{run}_s{seed}", corpus, work / "runs" / f"{name}_{run}_s{seed}",
                           hidden=c["hidden"], batch=batch, lr=c["lr"], min_lr=c["lr"] / 10,
                           seed=seed, eval_every=max(2, c["steps"] // 64),
                           **{"train_tokens": total, "warmup": c["warmup_steps"] * batch, **kw})
        cfg["model"]["num_layers"] = c["layers"]
        if c["layers"] == 4:
            cfg["model"]["num_attention_heads"] = 8
        cfg["logging"]["forecast"] = False  # the analysis below refits; no live check needed
        return bench.train(work, cfg)

    cc1 = go("cc1", schedule="constant", train_tokens=stable)
    return {"cosine": go("cosine"),
            "const_cooldown": go("cc2", schedule="linear", warmup=stable, decay_tokens=total,
                                 continue_from=cc1)}


def checks(runs: dict, steps: int) -> dict:
    from megatron_tinyllama.scaling.forecast.history import build_schedule, load_history
    from megatron_tinyllama.scaling.forecast.law import fit_curve, lr_areas
    from megatron_tinyllama.scaling.forecast.predict import fit_points, forecast_history

    def points(run: Path):
        h = load_history(run)
        sch = build_schedule(h.segments)
        areas = lr_areas(sch.lr, sch.step_tokens, sch.reference_tokens)
        _, idx, y = fit_points(sch, h.valid, areas=areas)
        return areas.s1[idx], areas.s2[idx], np.asarray(y)

    cos, cc = points(runs["cosine"]), points(runs["const_cooldown"])
    fit = fit_curve(*cos)
    signed = (fit.law(cc[0], cc[1]) - cc[2]) / cc[2]
    joint = fit_curve(*(np.concatenate([a, b]) for a, b in zip(cos, cc)))
    hist = load_history(runs["cosine"])
    early = forecast_history(hist, fit_until_step=int(0.3 * steps), replicates=50)
    end = float(cos[2][-1])
    law = fit.law
    return {
        "cosine_fit": {"L0": law.L0, "A": law.A, "alpha": law.alpha, "C": law.C,
                       "rms_residual": fit.rms_residual, "points": fit.num_points},
        "const_cooldown_mean_error": float(np.abs(signed).mean()),
        "const_cooldown_signed_end_error": float(signed[-1]),
        "joint_fit": {"L0": joint.law.L0, "rms_residual": joint.rms_residual,
                      "const_cooldown_mean_error": float(np.mean(
                          np.abs(joint.law(cc[0], cc[1]) - cc[2]) / cc[2])),
                      "cosine_mean_error": float(np.mean(
                          np.abs(joint.law(cos[0], cos[1]) - cos[2]) / cos[2]))},
        "first30_end_error": abs(early.final_loss - end) / end,
        "first30_burn_in_spread": early.burn_in_spread,
        "first30_caveats": list(early.caveats_by_key()),
        "live_caveats": bench.live_caveat_counts(runs["cosine"]),
        "final_loss": end,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_forecast_regimes"))
    p.add_argument("--out", type=Path,
                   default=REPO / "benchmarks" / "results" / "forecast_regimes.json")
    p.add_argument("--setups", default="ABCD", help="which of A, B, C, D to run")
    args = p.parse_args(argv)
    from megatron_tinyllama.data.demo_corpus import build_demo_corpus

    work = args.work_dir.resolve()
    setup = {"setups": SETUPS, "seeds": SEEDS, "seq": bench.SEQ, "vocab": 512,
             "data": "demo corpus, code stream", "max_code_bytes": bench.ALL_CODE}
    stamp = work / "setup.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != json.loads(json.dumps(setup)):
        raise SystemExit(f"{work} holds runs of another setup ({stamp}); pass another --work-dir")
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(setup, indent=1))
    corpus = build_demo_corpus(work / "corpus", vocab_size=512,
                               max_code_bytes=bench.ALL_CODE).text_prefix.parent
    available = bench.corpus_tokens(corpus, "code_document")
    results: dict = {"setup": setup, "tokens_available": available, "per_setup": {}}
    t0 = time.time()
    for name in args.setups:
        c = SETUPS[name]
        tokens = c["steps"] * bench.SEQ * c["batch_seqs"]
        if available < tokens:
            raise SystemExit(f"setup {name} trains {tokens:,} tokens, the code stream has "
                             f"{available:,}: runs would repeat data")
        results["per_setup"][name] = {
            str(seed): checks(train_setup(work, corpus, name, seed), c["steps"])
            for seed in SEEDS}
    results["analysis_seconds"] = round(time.time() - t0)
    results["train_seconds"] = {name: sum(bench.log_seconds(log) for log in
                                          (work / "logs").glob(f"{name}_*_s*.log"))
                                for name in args.setups}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("setup seed | const+cooldown mean (end, signed) | joint fit cc/cos, L0 | cosine L0, "
          "alpha, rms | first 30% -> end (burn-in spread)")
    for name, per_seed in results["per_setup"].items():
        for seed, r in per_seed.items():
            f, j = r["cosine_fit"], r["joint_fit"]
            pct = {k: 100 * v for k, v in r.items() if isinstance(v, float)}
            print(f"{name} {seed:>4} | {pct['const_cooldown_mean_error']:.2f}% "
                  f"({pct['const_cooldown_signed_end_error']:+.1f}%) | "
                  f"{100 * j['const_cooldown_mean_error']:.2f}%/"
                  f"{100 * j['cosine_mean_error']:.2f}%, {j['L0']:.2f} | {f['L0']:.2f}, {f['alpha']:.2f}, {f['rms_residual']:.4f} | "
                  f"{pct['first30_end_error']:.1f}% ({pct.get('first30_burn_in_spread', 0):.0f}%)")
    live = [r["live_caveats"] for per_seed in results["per_setup"].values()
            for r in per_seed.values()]
    total = {k: sum(r[k] for r in live) for k in live[0]}
    results["live_caveats_total"] = total
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"live check replayed on the cosine runs: {total['off']} of {total['checks']} forecasts "
          f"of the end off by > 2%, {total['off_no_caveat']} of them without a caveat "
          f"({total['off_no_caveat_without_burn_in']} without burn_in_sensitive); "
          f"{total['within_caveat']} of the {total['within']} within 2% with one "
          f"({total['within_caveat_without_burn_in']})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
