"""This module owns ``tinyllama-eval``: the paper's evaluation of one model, as a table and a JSON.

    tinyllama-eval --model runs/tinyllama-v1.1/stage3-math_code            # all three suites
    tinyllama-eval --model hf/TinyLlama_v1.1 --suite commonsense chinese --output v1_1.json
    tinyllama-eval --model runs/x --suite all --allow-code-execution       # with HumanEval
    tinyllama-eval --model runs/x --dry-run                                # what it would run

``--model`` is an HF Llama directory or this stack's checkpoint (a run's save_dir evaluates its
latest complete checkpoint). The JSON goes to ``--output``, by default ``eval_results.json`` in
the run's save_dir (where ``tinyllama-scaling fit --runs`` finds it) or in the current directory.
Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_tinyllama.evaluation.harness import EvalError, resolve_model, run_evaluation
from megatron_tinyllama.evaluation.report import EVAL_FILE, EvalFileError, format_table, save_report
from megatron_tinyllama.evaluation.suites import SUITES, SuiteError, local_task, select_tasks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinyllama-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="HF Llama directory, or a checkpoint of this stack (run save_dir, "
                        "checkpoint tag or model directory)")
    p.add_argument("--suite", nargs="*", default=None, choices=sorted(SUITES) + ["all"],
                   help="paper suites to run (default: all, HumanEval only with "
                        "--allow-code-execution; none when --task/--local-task is given)")
    p.add_argument("--task", nargs="*", default=[],
                   help="single paper tasks by name (e.g. hellaswag mmlu xcopa_zh)")
    p.add_argument("--local-task", nargs="*", default=[], metavar="NAME[:METRIC[:SHOTS]]",
                   help="tasks defined by YAMLs in --include-path (default metric acc, 0-shot)")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--output", type=Path, help=f"results JSON (default: {EVAL_FILE} in the run's "
                                               "save_dir, else in the current directory)")
    p.add_argument("--tokenizer-model", help="sentencepiece model for a checkpoint (default: "
                                             "the checkpoint's, else the run's data.tokenizer_model)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", default="8", help="lm-eval batch size, or 'auto'")
    p.add_argument("--dtype", default="auto", help="weights dtype (auto, bfloat16, float32)")
    p.add_argument("--limit", type=int,
                   help="only the first N documents per task (a smoke test, not the paper's numbers)")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="consent to run model-generated code (HumanEval)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, then exit")
    return p


def _plan(source, tasks) -> str:
    lines = [f"model: {source.describe()}", "lm-eval tasks:"]
    for t in tasks:
        lines.append(f"  {t.suite:<13s} {t.lm_eval_task:<16s} {t.num_fewshot}-shot  "
                     f"{t.result_key}" + ("  (runs generated code)" if t.executes_code else ""))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tinyllama-eval``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        default_run = args.suite is None and not args.task and not args.local_task
        suites = ["all"] if default_run else (args.suite or [])
        tasks = select_tasks(suites, args.task) + [local_task(s) for s in args.local_task]
        if default_run and not args.allow_code_execution:
            # Asked for by name, HumanEval without consent is an error (run_evaluation); in the
            # default run it is left out with a note instead.
            skipped = [t.name for t in tasks if t.executes_code]
            tasks = [t for t in tasks if not t.executes_code]
            print(f"note: {', '.join(skipped)} left out (it runs model-generated code); add "
                  "--allow-code-execution to include it")
        if args.local_task and not args.include_path:
            raise SuiteError("--local-task needs --include-path (the folder of its YAML)")
        if not tasks:
            raise SuiteError("nothing to run: give --suite, --task or --local-task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise SuiteError(f"a task is given twice: {names}")
        source = resolve_model(args.model, args.tokenizer_model)
        print(_plan(source, tasks), flush=True)
        if args.dry_run:
            return 0
        batch_size = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
        report, _ = run_evaluation(
            source, tasks, device=args.device, batch_size=batch_size, dtype=args.dtype,
            limit=args.limit, include_path=args.include_path,
            include_defaults=any(t.suite != "local" for t in tasks),
            allow_code_execution=args.allow_code_execution)
        output = args.output or (source.run_dir / EVAL_FILE if source.run_dir else Path(EVAL_FILE))
        print()
        print(format_table(report))
        save_report(report, output)
        print(f"\nwrote {output}")
    except (EvalError, SuiteError, EvalFileError) as err:
        print(f"tinyllama-eval: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
