"""Training runs as scaling-law points: the released over-training testbed and this stack's runs.

Two sources give the same :class:`RunPoint` (N parameters, D tokens, validation losses, and for
the testbed the downstream accuracies):

* The testbed of Gadre et al. (2024), whose released ``exp_data`` folder ships with this package
  (``scaling/testbed_data/``, MIT licence, unchanged; see its ``PROVENANCE.md``):
  ``models/<name>.json`` holds hyperparameters (``params`` = N, ``tokens`` = D) and ``results``,
  one validation loss per eval set; ``evals/evaluation_<name>_heavy.json`` holds 46 downstream
  accuracies as fractions in ``eval_metrics.icl``.
* A run of this stack: its ``checkpoint.save_dir`` holds ``config.yaml`` (the resolved
  JobConfig) and ``metrics.jsonl``; N comes from the model config, D and L from the last record
  with a ``valid_loss``. The downstream accuracies come from ``eval_results.json``, written there
  by ``tinyllama-eval`` (or given explicitly); when it names the checkpoint's token count, D and L
  are those of the validation record at that count, so loss and error describe the same weights.

A file without a needed field raises :class:`RunFileError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from megatron_tinyllama.scaling.errors import RunFileError
from megatron_tinyllama.scaling.run_metrics import iter_records

PACKAGED_TESTBED = Path(__file__).resolve().parent / "testbed_data" / "exp_data"
"""The released testbed results shipped with the package (the default of ``--testbed-dir``)."""
C4_EVAL = "c4_val"
"""Key of the paper's default loss set, C4 eval (``val_data`` path .../c4_val/...)."""
STACK_EVAL = "valid"
"""Key under which a stack run's ``valid_loss`` is stored."""
TESTBED_DATASETS = {"rpj": "RedPajama", "c4_original": "C4", "rw_original": "RefinedWeb"}

# The paper's 17-task split, as keys of evals/*.json. Its table names the last task "WinoGrand";
# the released code (mlfoundations/scaling, scaling/constants.py SUBSET) uses `winograd`, the
# Winograd schema challenge, not `winogrande`. With `winograd` the released numbers reproduce
# (0.05% / 3.6% error-law relative errors); with `winogrande` they become 1.5% / 4.6%.
PAPER_17_TASKS: tuple[str, ...] = (
    "arc_easy",
    "bigbench_cs_algorithms",
    "bigbench_dyck_languages",
    "bigbench_novel_concepts",
    "bigbench_operators",
    "bigbench_qa_wikidata",
    "boolq",
    "commonsense_qa",
    "copa",
    "coqa",
    "hellaswag_zeroshot",
    "hellaswag",
    "lambada_openai",
    "piqa",
    "pubmed_qa_labeled",
    "squad",
    "winograd",
)

# The paper's Table 1 protocol: the loss law is fitted on four shapes at M = 20 plus the smallest
# at M = 320; the error law adds the 1.4B M = 20 run. (shape, M) pairs.
PAPER_LOSS_FIT_RUNS: tuple[tuple[str, float], ...] = (
    ("d=96_l=8_h=4", 20.0),
    ("d=512_l=8_h=4", 20.0),
    ("d=576_l=24_h=8", 20.0),
    ("d=1024_l=24_h=8", 20.0),
    ("d=96_l=8_h=4", 320.0),
)
PAPER_ERROR_EXTRA_RUNS: tuple[tuple[str, float], ...] = (("open_lm_1b", 20.0),)
PAPER_LARGE_SHAPES = ("open_lm_1b", "open_lm_7b")


@dataclass(frozen=True)
class RunPoint:
    """One finished training run as a scaling-law point."""

    name: str
    source: str
    """File or folder it was read from (for messages)."""
    dataset: str
    """Training set ('rpj', 'c4_original', 'rw_original', or 'stack' for this stack's runs)."""
    shape: str
    """Model shape: open_lm name ('d=96_l=8_h=4', 'open_lm_1b') or this stack's preset."""
    params: int
    """N: total parameters, embeddings included (the paper's ``params``)."""
    tokens: int
    """D: training tokens."""
    losses: Mapping[str, float]
    """Validation loss per eval set ('c4_val', 'openlm', 'paloma_*', ... or 'valid')."""
    accuracies: Optional[Mapping[str, float]] = None
    """Downstream top-1 accuracy per task, fractions in [0, 1]; None when not evaluated."""
    accuracy_source: Optional[str] = None
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    """The testbed's released hyperparameters (empty for this stack's runs)."""
    launch_args: tuple[str, ...] = ()
    """The testbed's ``open_lm_args`` (the command line the run was started with)."""
    error_tasks: tuple[str, ...] = ()
    """Tasks whose mean error is this run's average top-1 error by default (a stack run: the
    multiple-choice tasks tinyllama-eval ran); empty means the paper's 17."""

    @property
    def compute(self) -> float:
        """C = 6·N·D training FLOPs."""
        return 6.0 * self.params * self.tokens

    @property
    def multiplier(self) -> float:
        """M = D/N; the testbed's runs are exactly 20 x chinchilla_multiplier."""
        return self.tokens / self.params

    def loss(self, eval_set: str) -> float:
        """Validation loss on ``eval_set``; a clear error names the sets this run has."""
        if eval_set not in self.losses:
            raise RunFileError(
                f"{self.source}: no validation loss for eval set {eval_set!r}; "
                f"it has {sorted(self.losses)}"
            )
        return self.losses[eval_set]

    def average_error(self, tasks: Optional[Sequence[str]] = None) -> float:
        """Average top-1 error ``mean(1 − accuracy)`` over ``tasks`` (default: ``error_tasks``,
        else the paper's 17)."""
        if self.accuracies is None:
            raise RunFileError(f"{self.source}: no downstream evaluations for run {self.name!r}")
        tasks = tuple(tasks or self.error_tasks or PAPER_17_TASKS)
        missing = [t for t in tasks if t not in self.accuracies]
        if missing:
            raise RunFileError(f"{self.accuracy_source}: lacks task(s) {missing}; it has "
                               f"{sorted(self.accuracies)}")
        return sum(1.0 - self.accuracies[t] for t in tasks) / len(tasks)


# ---------------------------------------------------------------------------------------------
# Locating and reading the released testbed.


def find_testbed_dir(explicit: Optional[Union[str, Path]] = None) -> Path:
    """The testbed's ``exp_data`` folder.

    Args:
        explicit: a path given by the user (``--testbed-dir``); either ``exp_data`` itself or a
            folder holding it.

    Returns:
        The folder holding ``models/`` and ``evals/``: ``explicit`` when given, else the copy
        shipped with the package (:data:`PACKAGED_TESTBED`).

    Raises:
        RunFileError: nothing found, naming every place looked at.
    """
    if explicit is not None:
        candidates = [Path(explicit), Path(explicit) / "exp_data"]
        hint = "pass the testbed's exp_data folder to --testbed-dir"
    else:
        candidates = [PACKAGED_TESTBED]
        hint = "the package was installed without its data; reinstall it or pass --testbed-dir"
    for cand in candidates:
        if (cand / "models").is_dir():
            return cand.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise RunFileError(f"testbed not found (no models/ folder in: {looked}); {hint}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise RunFileError(f"{path}: cannot read ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise RunFileError(f"{path}: not valid JSON ({err})") from None


def _get(data: Any, dotted: str, path: Path, kind: type | tuple[type, ...]) -> Any:
    node = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise RunFileError(f"{path}: missing field {dotted!r}")
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, kind):
        raise RunFileError(f"{path}: field {dotted!r} has type {type(node).__name__}")
    return node


def _positive_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunFileError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise RunFileError(f"{where}: expected a finite positive number, got {value!r}")
    return value


def eval_set_key(val_data_path: str) -> str:
    """Short key of a ``results[*].val_data`` path: its folder (``.../c4_val/x.tar`` → c4_val)."""
    parts = val_data_path.replace("\\", "/").split("/")
    return parts[-2] if len(parts) >= 2 else parts[-1]


def load_testbed_run(
    path: Union[str, Path], eval_dir: Optional[Union[str, Path]] = None
) -> RunPoint:
    """Read one ``models/<name>.json`` of the testbed (and its downstream evals when present).

    Args:
        path: the model JSON.
        eval_dir: folder of ``evaluation_<name>_heavy.json``; defaults to ``../evals`` beside it.
            A missing eval file leaves ``accuracies`` None (only error-law fits need it).

    Raises:
        RunFileError: unreadable file, or a missing/invalid ``hyperparameters.params``,
            ``hyperparameters.tokens``, ``hyperparameters.model`` or ``results`` entry.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise RunFileError(f"{path}: expected a JSON object")
    hp = _get(data, "hyperparameters", path, dict)
    params = _positive_number(
        _get(data, "hyperparameters.params", path, (int, float)), f"{path}: hyperparameters.params"
    )
    tokens = _positive_number(
        _get(data, "hyperparameters.tokens", path, (int, float)), f"{path}: hyperparameters.tokens"
    )
    shape = Path(_get(data, "hyperparameters.model", path, str)).stem
    losses: dict[str, float] = {}
    for i, result in enumerate(_get(data, "results", path, list)):
        where = f"{path}: results[{i}]"
        if not isinstance(result, dict) or "loss" not in result or "val_data" not in result:
            raise RunFileError(f"{where}: missing field 'loss' or 'val_data'")
        val_data = result["val_data"]
        if not (isinstance(val_data, list) and val_data and isinstance(val_data[0], str)):
            raise RunFileError(f"{where}.val_data: expected a list of paths")
        losses[eval_set_key(val_data[0])] = float(_positive_number(result["loss"], f"{where}.loss"))
    if not losses:
        raise RunFileError(f"{path}: field 'results' is empty (no validation loss)")

    eval_dir = Path(eval_dir) if eval_dir is not None else path.parent.parent / "evals"
    eval_path = eval_dir / f"evaluation_{path.stem}_heavy.json"
    accuracies = None
    if eval_path.exists():
        icl = _get(_read_json(eval_path), "eval_metrics.icl", eval_path, dict)
        accuracies = {}
        for task, acc in icl.items():
            if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0 <= acc <= 1:
                raise RunFileError(
                    f"{eval_path}: eval_metrics.icl.{task} = {acc!r} is not an accuracy "
                    "fraction in [0, 1]"
                )
            accuracies[task] = float(acc)
    return RunPoint(
        name=str(data.get("name", path.stem)),
        source=str(path),
        dataset=str(data.get("dataset_name", path.stem.split("-")[0])),
        shape=shape,
        params=int(params),
        tokens=int(tokens),
        losses=losses,
        accuracies=accuracies,
        accuracy_source=str(eval_path) if accuracies is not None else None,
        hyperparameters=dict(hp),
        launch_args=tuple(str(a) for a in data.get("open_lm_args", [])),
    )


def load_testbed(
    testbed_dir: Union[str, Path], datasets: Optional[Iterable[str]] = None
) -> list[RunPoint]:
    """Runs of the testbed in ``testbed_dir`` (an ``exp_data`` folder), all or of ``datasets``."""
    testbed_dir = Path(testbed_dir)
    paths = sorted((testbed_dir / "models").glob("*.json"))
    if not paths:
        raise RunFileError(f"{testbed_dir / 'models'}: no model JSON files")
    runs = [load_testbed_run(p, testbed_dir / "evals") for p in paths]
    if datasets is not None:
        wanted = set(datasets)
        unknown = wanted - {r.dataset for r in runs}
        if unknown:
            raise RunFileError(
                f"{testbed_dir}: no runs for dataset(s) {sorted(unknown)}; "
                f"it has {sorted({r.dataset for r in runs})}"
            )
        runs = [r for r in runs if r.dataset in wanted]
    return runs


def load_random_baselines(testbed_dir: Union[str, Path]) -> dict[str, float]:
    """Random-chance accuracy per task (fractions) from the testbed's ``eval_metadata.csv``."""
    import csv

    path = Path(testbed_dir) / "eval_metadata.csv"
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise RunFileError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return {row["Eval Task"]: float(row["Random baseline"]) / 100.0 for row in rows}
    except (KeyError, ValueError) as err:
        raise RunFileError(f"{path}: missing or bad column ({err})") from None


def select_runs(
    runs: Sequence[RunPoint], dataset: str, shape_multipliers: Iterable[tuple[str, float]]
) -> list[RunPoint]:
    """The runs of ``dataset`` matching each (shape, M), in that order; each must exist once."""
    chosen = []
    for shape, mult in shape_multipliers:
        hits = [
            r
            for r in runs
            if r.dataset == dataset
            and r.shape == shape
            and math.isclose(r.multiplier, mult, rel_tol=1e-3)
        ]
        if len(hits) != 1:
            raise RunFileError(
                f"testbed: expected one run of {dataset} {shape} at M={mult:g}, found {len(hits)}"
            )
        chosen.append(hits[0])
    return chosen


def held_out_runs(
    runs: Sequence[RunPoint], dataset: str, exclude: Sequence[RunPoint]
) -> list[RunPoint]:
    """The paper's extrapolation targets: the 1.4B and 6.9B runs of ``dataset`` not fitted on."""
    names = {r.name for r in exclude}
    picked = [
        r
        for r in runs
        if r.dataset == dataset and r.shape in PAPER_LARGE_SHAPES and r.name not in names
    ]
    return sorted(picked, key=lambda r: r.compute)


# ---------------------------------------------------------------------------------------------
# This stack's runs.


def _load_stack_eval(path: Path):
    """A tinyllama-eval results file (an ``EvalReport``); smoke-test (``--limit``) results are
    refused."""
    from megatron_tinyllama.evaluation.report import EvalFileError, load_report

    try:
        report = load_report(path)
    except EvalFileError as err:
        raise RunFileError(str(err)) from None
    if report.settings.get("limit") is not None:
        raise RunFileError(f"{path}: evaluated with --limit {report.settings['limit']} (a smoke "
                           "test on part of each task); rerun tinyllama-eval without it to fit")
    if not report.top1_error_tasks:
        raise RunFileError(f"{path}: no multiple-choice task, so no average top-1 error")
    return report


def load_stack_run(path: Union[str, Path], eval_path: Optional[Union[str, Path]] = None
                   ) -> RunPoint:
    """Read a run of this stack from its ``checkpoint.save_dir``.

    Args:
        path: the run folder (or its ``config.yaml`` / ``metrics.jsonl``).
        eval_path: tinyllama-eval's results for this run; defaults to ``eval_results.json`` in the
            run folder when present (else the run has no downstream accuracies).

    Returns:
        N from ``ModelConfig.num_parameters()`` of the saved config (LayerNorm biases counted, so a
        testbed shape comes out slightly larger than open_lm's ``params``), D and L from the last
        ``metrics.jsonl`` record with a ``valid_loss``, or, when the results file names the
        evaluated checkpoint's tokens, from the record at those tokens. Accuracies are the results'
        values (fractions); ``error_tasks`` are its multiple-choice tasks.

    Raises:
        RunFileError: a missing or invalid config.yaml, metrics.jsonl, JSON line, ``tokens`` or
            ``valid_loss`` field, no ``valid_loss`` record at all, an invalid results file, or no
            validation record at the evaluated checkpoint's tokens.
    """
    from megatron_tinyllama.config import ConfigError, load_config
    from megatron_tinyllama.evaluation.report import EVAL_FILE

    run_dir = Path(path)
    if run_dir.is_file():
        run_dir = run_dir.parent
    if eval_path is None and (run_dir / EVAL_FILE).is_file():
        eval_path = run_dir / EVAL_FILE
    report = _load_stack_eval(Path(eval_path)) if eval_path is not None else None
    eval_tokens = report.model.get("tokens") if report is not None else None
    config_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not config_path.is_file():
        raise RunFileError(
            f"{config_path}: missing (a run folder holds config.yaml and metrics.jsonl)"
        )
    try:
        cfg = load_config(config_path)
    except ConfigError as err:
        raise RunFileError(f"{config_path}: not a valid JobConfig: {err}") from None
    last = at_eval = None
    # Strict: a final loss read from a cut line would be another run's point.
    for lineno, record in iter_records(metrics_path, cut_last_line_ok=False):
        where = f"{metrics_path}:{lineno}"
        if not isinstance(record, dict) or "valid_loss" not in record:
            continue
        if "tokens" not in record:
            raise RunFileError(f"{where}: record with 'valid_loss' lacks field 'tokens'")
        last = (
            int(_positive_number(record["tokens"], f"{where}: field 'tokens'")),
            float(_positive_number(record["valid_loss"], f"{where}: field 'valid_loss'")),
        )
        if eval_tokens is not None and last[0] == eval_tokens:
            at_eval = last
    if last is None:
        raise RunFileError(
            f"{metrics_path}: no record with field 'valid_loss' (was validation enabled?)"
        )
    if eval_tokens is not None and at_eval is None:
        raise RunFileError(
            f"{metrics_path}: no validation loss at {eval_tokens:,} tokens, where the checkpoint "
            f"evaluated in {report.source} stood (last validation at {last[0]:,}); evaluate a "
            "checkpoint whose tokens have a validation record (the final one always has)"
        )
    tokens, loss = at_eval or last
    model = cfg.model
    shape = (
        model.preset or f"d={model.hidden_size}_l={model.num_layers}_h={model.num_attention_heads}"
    )
    return RunPoint(
        name=cfg.name,
        source=str(run_dir),
        dataset="stack",
        shape=shape,
        params=model.num_parameters(),
        tokens=tokens,
        losses={STACK_EVAL: loss},
        accuracies=report.values if report is not None else None,
        accuracy_source=report.source if report is not None else None,
        error_tasks=report.top1_error_tasks if report is not None else (),
    )


def load_runs(
    paths: Iterable[Union[str, Path]],
    eval_files: Optional[Mapping[Union[str, Path], Union[str, Path]]] = None,
) -> list[RunPoint]:
    """Read runs given as testbed model JSONs or this stack's run folders, in order.

    Args:
        paths: testbed model JSONs or run folders.
        eval_files: run folder -> tinyllama-eval results file, for results kept elsewhere than
            the run folder's ``eval_results.json``.

    Raises:
        RunFileError: a path that is neither, or an eval file given for a run not in ``paths``.
    """
    eval_files = {Path(k).resolve(): Path(v) for k, v in (eval_files or {}).items()}
    runs, used = [], set()
    for p in paths:
        p = Path(p)
        if p.suffix == ".json" and p.is_file():
            runs.append(load_testbed_run(p))
        elif p.is_dir() or p.name in ("config.yaml", "metrics.jsonl"):
            run_dir = (p if p.is_dir() else p.parent).resolve()
            used.add(run_dir)
            runs.append(load_stack_run(p, eval_files.get(run_dir)))
        else:
            raise RunFileError(f"{p}: not a testbed model JSON nor a run folder with config.yaml")
    stray = sorted(str(k) for k in set(eval_files) - used)
    if stray:
        raise RunFileError(f"--eval names run folder(s) not given with --runs: {stray}")
    return runs


_TESTBED_SHAPE = re.compile(r"^d=(\d+)_l=(\d+)_h=(\d+)$")


def preset_for_shape(shape: str) -> str:
    """This stack's preset name of an open_lm shape ('d=96_l=8_h=4' → 'testbed-d96-l8-h4')."""
    m = _TESTBED_SHAPE.match(shape)
    return f"testbed-d{m[1]}-l{m[2]}-h{m[3]}" if m else shape
