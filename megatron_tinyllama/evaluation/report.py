"""This module owns the evaluation results file and the table printed beside the paper's numbers.

``tinyllama-eval`` writes one JSON per evaluated model (``eval_results.json`` in a run's save_dir
by default); the scaling toolkit reads it back for the average top-1 error. Values are fractions in
[0, 1] as lm-eval reports them; the table prints percentages like the paper. This module imports
neither torch nor lm-eval, so readers of the file stay light.

File layout (``format_version`` 1)::

    {"format": "megatron-tinyllama-eval", "format_version": 1,
     "model": {"path": ..., "kind": "hf" | "checkpoint", "checkpoint_tag": ..., "tokens": ...},
     "lm_eval_version": "0.4.13", "settings": {...},
     "tasks": {"hellaswag": {"suite", "lm_eval_task", "num_fewshot", "metric", "value",
                             "stderr", "multiple_choice"}, ...},
     "suite_averages": {"commonsense": 0.53, ...},
     "top1_error_tasks": [...], "average_top1_error": 0.47}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from megatron_tinyllama.evaluation import paper_results
from megatron_tinyllama.evaluation.suites import SUITE_TITLES, SUITES, EvalTask

EVAL_FILE = "eval_results.json"
"""Default name of the results file in a run's save_dir (what ``tinyllama-scaling`` looks for)."""
FORMAT = "megatron-tinyllama-eval"
FORMAT_VERSION = 1


class EvalFileError(ValueError):
    """A results file that is missing, unreadable, or lacks a field; names the file and field."""


@dataclass(frozen=True)
class TaskResult:
    """One evaluated number."""

    task: EvalTask
    value: float
    """The metric as a fraction in [0, 1]."""
    stderr: Optional[float] = None


@dataclass(frozen=True)
class EvalReport:
    """Everything one ``tinyllama-eval`` run measured."""

    results: tuple[TaskResult, ...]
    model: dict[str, Any] = field(default_factory=dict)
    """``path``, ``kind`` (hf or checkpoint), ``checkpoint_tag`` and ``tokens`` when known."""
    lm_eval_version: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    """File it was read from (for messages)."""

    @property
    def values(self) -> dict[str, float]:
        return {r.task.name: r.value for r in self.results}

    @property
    def top1_error_tasks(self) -> tuple[str, ...]:
        """Tasks scored by top-1 accuracy over given choices (the multiple-choice ones)."""
        return tuple(r.task.name for r in self.results if r.task.multiple_choice)

    @property
    def average_top1_error(self) -> Optional[float]:
        """Mean of 1 - accuracy over :attr:`top1_error_tasks`; None without such tasks."""
        names = self.top1_error_tasks
        if not names:
            return None
        return sum(1.0 - self.values[n] for n in names) / len(names)

    def suite_average(self, suite: str) -> Optional[float]:
        """Mean over a paper suite, only when every task of it was run (the paper's Avg)."""
        values = self.values
        names = [t.name for t in SUITES.get(suite, ())]
        if not names or any(n not in values for n in names):
            return None
        return sum(values[n] for n in names) / len(names)


def report_to_dict(report: EvalReport) -> dict[str, Any]:
    tasks = {}
    for r in report.results:
        t = r.task
        tasks[t.name] = {"suite": t.suite, "lm_eval_task": t.lm_eval_task,
                         "num_fewshot": t.num_fewshot, "metric": t.metric,
                         "metric_filter": t.metric_filter, "value": r.value, "stderr": r.stderr,
                         "multiple_choice": t.multiple_choice}
    averages = {s: report.suite_average(s) for s in SUITES}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": report.model,
            "lm_eval_version": report.lm_eval_version, "settings": report.settings,
            "tasks": tasks,
            "suite_averages": {s: v for s, v in averages.items() if v is not None},
            "top1_error_tasks": list(report.top1_error_tasks),
            "average_top1_error": report.average_top1_error}


def save_report(report: EvalReport, path: Union[str, Path]) -> Path:
    """Write the JSON atomically (a temporary file renamed), so a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report_to_dict(report), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _field(data: dict, key: str, kinds, where: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise EvalFileError(f"{where}: missing field {key!r}")
    value = data[key]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise EvalFileError(f"{where}: field {key!r} has type bool")
    if not isinstance(value, kinds):
        raise EvalFileError(f"{where}: field {key!r} has type {type(value).__name__}")
    return value


def load_report(path: Union[str, Path]) -> EvalReport:
    """Read a results file written by :func:`save_report`.

    Raises:
        EvalFileError: unreadable, not this format, or a task without a valid ``value`` (a
            fraction in [0, 1]); the message names the file and the field.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise EvalFileError(f"{path}: cannot read ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise EvalFileError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EvalFileError(f"{path}: not a tinyllama-eval results file (field 'format' is not "
                            f"{FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise EvalFileError(f"{path}: format_version {data.get('format_version')!r} is not "
                            f"{FORMAT_VERSION}")
    results = []
    for name, entry in _field(data, "tasks", dict, str(path)).items():
        where = f"{path}: tasks.{name}"
        value = _field(entry, "value", (int, float), where)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise EvalFileError(f"{where}.value = {value!r} is not a fraction in [0, 1]")
        task = EvalTask(name=name, suite=str(_field(entry, "suite", str, where)),
                        lm_eval_task=str(_field(entry, "lm_eval_task", str, where)),
                        num_fewshot=int(_field(entry, "num_fewshot", int, where)),
                        metric=str(_field(entry, "metric", str, where)),
                        metric_filter=str(entry.get("metric_filter", "none")),
                        multiple_choice=bool(_field(entry, "multiple_choice", bool, where)))
        stderr = entry.get("stderr")
        results.append(TaskResult(task, float(value),
                                  float(stderr) if isinstance(stderr, (int, float)) else None))
    if not results:
        raise EvalFileError(f"{path}: field 'tasks' is empty")
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    return EvalReport(tuple(results), model, str(data.get("lm_eval_version", "")),
                      dict(data.get("settings") or {}), source=str(path))


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(report: EvalReport, models: Sequence[str] = paper_results.MODELS) -> str:
    """Our numbers beside the paper's, one block per suite, percentages like the paper's tables.

    The Avg row shows our mean only when the whole suite ran, and the paper's printed Avg.
    """
    short = {"TinyLlama v1.0": "v1.0", "TinyLlama v1.1": "v1.1",
             "TinyLlama v1.1 Math&Code": "v1.1 M&C", "TinyLlama v1.1 Chinese": "v1.1 zh"}
    head = ["task", "shots", "metric", "ours"] + [short.get(m, m) for m in models]
    row = "{:<16s} {:>5s} {:<16s} {:>7s}" + " {:>9s}" * len(models)
    lines = []
    suites = list(dict.fromkeys(r.task.suite for r in report.results))
    for suite in suites:
        lines += ["", SUITE_TITLES.get(suite, suite) + (
            f"  [paper: {paper_results.TABLE_SOURCES[suite]}]"
            if suite in paper_results.TABLE_SOURCES else ""), row.format(*head)]
        for r in (r for r in report.results if r.task.suite == suite):
            paper = [_pct(paper_results.paper_value(suite, r.task.name, m)) for m in models]
            lines.append(row.format(r.task.name, str(r.task.num_fewshot), r.task.result_key,
                                    _pct(100 * r.value), *paper))
        if suite in paper_results.AVERAGES:
            ours = report.suite_average(suite)
            paper = [_pct(paper_results.AVERAGES[suite].get(m)) for m in models]
            lines.append(row.format("Avg", "", "", _pct(None if ours is None else 100 * ours),
                                    *paper))
    err = report.average_top1_error
    if err is not None:
        lines += ["", f"average top-1 error over {len(report.top1_error_tasks)} multiple-choice "
                      f"task(s): {err:.4f}"]
    return "\n".join(lines).lstrip("\n")
