"""This module owns what the paper's evaluation runs: suites of lm-eval tasks with shots and metric.

Task names are those of lm-evaluation-harness 0.4.x (``lm_eval --tasks list``). The paper ran its
commonsense and Chinese tables with an older harness and Table 4 with declare-lab/instruct-eval;
the closest lm-eval equivalents are used, so expect numbers close to, not equal to, the paper's:

* commonsense, 0-shot: ``acc_norm`` where the task has it, ``acc`` for WinoGrande and BoolQ
  (TinyLlama's EVAL.md: "We report the acc_norm by default").
* InstructEval: MMLU 5-shot ``acc``; BBH 3-shot ``bbh_fewshot`` (23 tasks' answer-only prompts,
  ``exact_match``); DROP 3-shot ``em`` (instruct-eval scores a prediction that starts with the
  gold span, on a filtered subset); HumanEval 0-shot ``pass@1`` (runs generated code).
* Chinese, 0-shot: ``acc``.

``multiple_choice`` marks the tasks whose metric is a top-1 accuracy over given choices; their
mean error is the "average top-1 error" the scaling toolkit fits Err(L) on (Gadre et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class EvalTask:
    """One number of a table: which lm-eval task (or group) and which of its metrics."""

    name: str
    """Key in our results JSON and the paper tables (``hellaswag``, ``bbh``, ...)."""
    suite: str
    """Table it belongs to: ``commonsense``, ``instructeval``, ``chinese``, or ``local``."""
    lm_eval_task: str
    """Task or group name given to lm-eval."""
    num_fewshot: int
    metric: str
    """lm-eval metric name (``acc``, ``acc_norm``, ``exact_match``, ``em``, ``pass@1``)."""
    metric_filter: str = "none"
    """lm-eval filter whose output the metric is read from: results key ``<metric>,<filter>``."""
    multiple_choice: bool = True
    executes_code: bool = False
    """The task runs model-generated code (HumanEval): needs explicit consent."""

    @property
    def result_key(self) -> str:
        return f"{self.metric},{self.metric_filter}"


def _suite(suite: str, specs: Iterable[tuple]) -> tuple[EvalTask, ...]:
    """(name, lm-eval task, shots, metric[, extra fields]) rows -> tasks of ``suite``."""
    return tuple(EvalTask(name=name, suite=suite, lm_eval_task=lm_task, num_fewshot=shots,
                          metric=metric, **(extra[0] if extra else {}))
                 for name, lm_task, shots, metric, *extra in specs)


SUITES: dict[str, tuple[EvalTask, ...]] = {
    "commonsense": _suite("commonsense", [
        ("hellaswag", "hellaswag", 0, "acc_norm"),
        ("openbookqa", "openbookqa", 0, "acc_norm"),
        ("winogrande", "winogrande", 0, "acc"),
        ("arc_challenge", "arc_challenge", 0, "acc_norm"),
        ("arc_easy", "arc_easy", 0, "acc_norm"),
        ("boolq", "boolq", 0, "acc"),
        ("piqa", "piqa", 0, "acc_norm"),
    ]),
    "instructeval": _suite("instructeval", [
        ("mmlu", "mmlu", 5, "acc"),
        ("bbh", "bbh_fewshot", 3, "exact_match", {"multiple_choice": False}),
        ("humaneval", "humaneval", 0, "pass@1",
         {"metric_filter": "create_test", "multiple_choice": False, "executes_code": True}),
        ("drop", "drop", 3, "em", {"multiple_choice": False}),
    ]),
    "chinese": _suite("chinese", [
        ("xwinograd_zh", "xwinograd_zh", 0, "acc"),
        ("xstorycloze_zh", "xstorycloze_zh", 0, "acc"),
        ("xnli_zh", "xnli_zh", 0, "acc"),
        ("xcopa_zh", "xcopa_zh", 0, "acc"),
    ]),
}

SUITE_TITLES = {
    "commonsense": "Commonsense reasoning, 0-shot",
    "instructeval": "InstructEval (MMLU 5-shot, BBH 3-shot, HumanEval 0-shot, DROP 3-shot)",
    "chinese": "Chinese understanding, 0-shot",
    "local": "Local tasks",
}


class SuiteError(ValueError):
    """An unknown suite or task name."""


def select_tasks(suites: Sequence[str] = (), tasks: Sequence[str] = ()) -> list[EvalTask]:
    """The paper tasks of ``suites`` (``all`` = every suite) plus single ``tasks`` by name.

    Raises:
        SuiteError: naming the unknown suite or task and the known ones.
    """
    by_name = {t.name: t for suite in SUITES.values() for t in suite}
    chosen: list[EvalTask] = []
    for suite in suites:
        if suite == "all":
            chosen += [t for s in SUITES.values() for t in s]
        elif suite in SUITES:
            chosen += SUITES[suite]
        else:
            raise SuiteError(f"unknown suite {suite!r}; known: {sorted(SUITES)} or 'all'")
    for name in tasks:
        if name not in by_name:
            raise SuiteError(f"unknown task {name!r}; known: {sorted(by_name)}")
        chosen.append(by_name[name])
    return list({t.name: t for t in chosen}.values())


def local_task(spec: str) -> EvalTask:
    """A task of ``--include-path`` from ``NAME[:METRIC[:SHOTS]]`` (default ``acc``, 0-shot).

    Raises:
        SuiteError: a malformed spec.
    """
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise SuiteError(f"local task {spec!r}: expected NAME[:METRIC[:SHOTS]]")
    metric = parts[1] if len(parts) > 1 and parts[1] else "acc"
    try:
        shots = int(parts[2]) if len(parts) > 2 else 0
    except ValueError:
        raise SuiteError(f"local task {spec!r}: SHOTS must be an integer") from None
    return EvalTask(name=parts[0], suite="local", lm_eval_task=parts[0], num_fewshot=shots,
                    metric=metric, multiple_choice=metric in ("acc", "acc_norm"))
