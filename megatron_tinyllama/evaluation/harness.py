"""This module owns running lm-evaluation-harness (the ``lm-eval`` package) on one model.

The model is an HF Llama directory, or this stack's checkpoint (a run's save_dir, a checkpoint
tag directory or a model directory), converted exactly to a temporary HF directory by
:func:`megatron_tinyllama.checkpoint.convert.convert_to_hf` and deleted afterwards. lm-eval's
``HFLM`` loads it once; ``simple_evaluate`` runs once per shot count; each task's metric is read
from lm-eval's results. BOS is prepended to every context, as TinyLlama's training documents
start with it and the paper's harness (``hf-causal`` with Llama's tokenizer) did.

The paper's tasks download their datasets from the Hugging Face Hub. Before loading anything the
Hub is probed (through any configured proxy); unreachable, the run stops with the tasks it would
have run. With ``HF_HUB_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1`` the probe is skipped and the
datasets must be in the local cache; a dataset missing there is reported with its task.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from megatron_tinyllama.evaluation.report import EvalReport, TaskResult
from megatron_tinyllama.evaluation.suites import EvalTask


class EvalError(RuntimeError):
    """The evaluation cannot run or failed; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """What ``--model`` names, resolved."""

    path: Path
    kind: str
    """``hf`` (config.json of a Llama) or ``checkpoint`` (this stack's weights)."""
    tokenizer_model: Optional[Path] = None
    """sentencepiece model exported with a converted checkpoint."""
    checkpoint_tag: Optional[str] = None
    tokens: Optional[int] = None
    """Tokens the checkpoint had trained on (from its trainer_state.json), when known."""
    run_dir: Optional[Path] = None
    """The run's save_dir when ``path`` is one (the default home of the results file)."""

    def describe(self) -> str:
        if self.kind == "hf":
            return f"{self.path} (Hugging Face directory)"
        where = f"{self.path}" + (f", checkpoint {self.checkpoint_tag}" if self.checkpoint_tag else "")
        tokens = f", {self.tokens:,} tokens" if self.tokens is not None else ""
        return f"{where}{tokens} (converted to HF in a temporary directory)"


def resolve_model(path: Union[str, Path], tokenizer_model: Optional[Union[str, Path]] = None
                  ) -> ModelSource:
    """Tell an HF directory from one of our checkpoints and find the checkpoint's tokenizer.

    The tokenizer of a checkpoint is ``tokenizer_model`` if given, else ``tokenizer.model`` in the
    model directory, else the run's ``data.tokenizer_model`` (its config.yaml).

    Raises:
        EvalError: neither kind, or a model without a tokenizer (see :func:`check_hf_tokenizer`).
    """
    path = Path(path)
    if (path / "config.json").is_file():
        check_hf_tokenizer(path)
        return ModelSource(path, "hf")
    from megatron_tinyllama.checkpoint.convert import resolve_model_dir
    from megatron_tinyllama.checkpoint.hf import ConversionError

    try:
        model_dir = resolve_model_dir(path)
    except ConversionError as err:
        raise EvalError(f"--model {path}: neither a Hugging Face directory (config.json) nor a "
                        f"checkpoint of this stack ({err})") from None
    tag, tokens, run_dir, run_tokenizer = None, None, None, None
    if (path / "latest").is_file():  # a run's save_dir
        run_dir = path
        tag = (path / "latest").read_text().strip()
        state = path / tag / "trainer_state.json"
        if state.is_file():
            tokens = int(json.loads(state.read_text()).get("consumed_tokens", 0)) or None
        if (path / "config.yaml").is_file():
            from megatron_tinyllama.config import load_config

            run_tokenizer = load_config(path / "config.yaml").data.tokenizer_model
    candidates = [tokenizer_model, model_dir / "tokenizer.model", run_tokenizer]
    tokenizer = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if tokenizer is None:
        tried = ", ".join(str(c) for c in candidates if c) or "none"
        raise EvalError(f"--model {path}: no tokenizer for the checkpoint (tried: {tried}); pass "
                        "--tokenizer-model")
    return ModelSource(path, "checkpoint", tokenizer, tag, tokens, run_dir)


# Files from which transformers' AutoTokenizer can build a tokenizer, one set per kind: the fast
# tokenizer's serialization, sentencepiece (Llama's, T5's), byte-level BPE, WordPiece.
_TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("spiece.model",),
                    ("vocab.json", "merges.txt"), ("vocab.txt",))


def check_hf_tokenizer(path: Path) -> None:
    """Refuse an HF directory from which no tokenizer can be loaded, naming the files it lacks.

    Without them transformers fails only after the model is loaded, and with a message that
    points elsewhere ("You need to have sentencepiece or tiktoken installed", when both are).

    Raises:
        EvalError: none of the tokenizer file sets is complete in ``path``.
    """
    if any(all((path / name).is_file() for name in files) for files in _TOKENIZER_FILES):
        return
    present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
    raise EvalError(f"--model {path}: no tokenizer files: neither tokenizer.json nor "
                    f"tokenizer.model (sentencepiece) is there (it holds: {present}); copy them "
                    f"from the model it came from, or export it again with tinyllama-convert-to-hf "
                    f"--tokenizer-model")


@contextlib.contextmanager
def hf_directory(source: ModelSource) -> Iterator[Path]:
    """The HF directory to load: the source itself, or an exact conversion deleted on exit."""
    if source.kind == "hf":
        yield source.path
        return
    from megatron_tinyllama.checkpoint.convert import convert_to_hf

    with tempfile.TemporaryDirectory(prefix="tinyllama-eval-") as tmp:
        out = convert_to_hf(source.path, Path(tmp) / "hf", tokenizer_model=source.tokenizer_model)
        yield out


def hub_offline_mode() -> bool:
    """True when the user asked the Hugging Face libraries to use their cache only."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face Hub answers (``HF_ENDPOINT`` if set; proxies honoured)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/datasets?limit=1",
                                                      method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False


def check_hub_for(tasks: Sequence[EvalTask]) -> None:
    """Fail before any loading when tasks need Hub datasets and the Hub cannot be reached.

    Raises:
        EvalError: naming the tasks and how to run them (online, or from a filled cache).
    """
    needing = [t for t in tasks if t.suite != "local"]
    if not needing or hub_offline_mode() or hub_reachable():
        return
    names = ", ".join(f"{t.lm_eval_task} ({t.num_fewshot}-shot)" for t in needing)
    raise EvalError(
        "cannot reach the Hugging Face Hub, where lm-eval downloads the datasets of " + names
        + ". Run on a machine with internet access, or fill the datasets cache there "
        "(HF_HOME) and rerun here with HF_DATASETS_OFFLINE=1.")


def _metric(results: dict, task: EvalTask) -> tuple[float, Optional[float]]:
    entry = results.get("results", {}).get(task.lm_eval_task) or results.get(
        "groups", {}).get(task.lm_eval_task)
    if entry is None or task.result_key not in entry:
        have = sorted(k for k in (entry or {}) if "," in k and "stderr" not in k)
        raise EvalError(f"lm-eval returned no {task.result_key!r} for task {task.lm_eval_task!r} "
                        f"(it has {have or 'no metrics'})")
    value = float(entry[task.result_key])
    stderr = entry.get(f"{task.metric}_stderr,{task.metric_filter}")
    return value, float(stderr) if isinstance(stderr, (int, float)) else None


def run_evaluation(source: ModelSource, tasks: Sequence[EvalTask], *, device: Optional[str] = None,
                   batch_size: Union[int, str] = 8, dtype: str = "auto",
                   limit: Optional[int] = None, include_path: Optional[Union[str, Path]] = None,
                   include_defaults: bool = True, allow_code_execution: bool = False,
                   check_hub: bool = True, keep_raw: bool = False
                   ) -> tuple[EvalReport, list[dict]]:
    """Run ``tasks`` on the model with lm-eval's Python API.

    Args:
        source: from :func:`resolve_model`.
        tasks: paper tasks (:mod:`.suites`) and/or local tasks of ``include_path``.
        device: torch device for HFLM (default: cuda when available, else cpu).
        batch_size: lm-eval batch size (an int or "auto").
        dtype: weights dtype for HFLM ("auto", "bfloat16", "float32", ...).
        limit: evaluate only the first ``limit`` documents of each task (smoke tests; not the
            paper's protocol).
        include_path: folder of extra task YAMLs (lm-eval's TaskManager include_path).
        include_defaults: index lm-eval's own tasks (False speeds up local-only runs).
        allow_code_execution: consent to run model-generated code (HumanEval).
        check_hub: probe the Hub first (see :func:`check_hub_for`).
        keep_raw: also return lm-eval's raw outputs with per-document samples.

    Returns:
        The report and, with ``keep_raw``, lm-eval's output dict of each call.

    Raises:
        EvalError: a task runs code without consent, the Hub is unreachable, a dataset cannot
            be loaded, or lm-eval does not know a task.
    """
    if not tasks:
        raise EvalError("no tasks to run")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise EvalError(f"task names must be distinct, got {names}")
    risky = [t.name for t in tasks if t.executes_code]
    if risky and not allow_code_execution:
        raise EvalError(f"{', '.join(risky)} runs model-generated Python code; pass "
                        "--allow-code-execution (preferably in a sandbox) or leave it out")
    if check_hub:
        check_hub_for(tasks)
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if allow_code_execution:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # lm-eval's code_eval metric refuses otherwise
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    task_manager = TaskManager(include_path=str(include_path) if include_path else None,
                               include_defaults=include_defaults)
    by_shots: dict[int, list[EvalTask]] = {}
    for task in tasks:
        by_shots.setdefault(task.num_fewshot, []).append(task)
    results, raws, versions = [], [], {}
    with hf_directory(source) as hf_dir:
        lm = HFLM(pretrained=str(hf_dir), device=device, dtype=dtype, batch_size=batch_size,
                  add_bos_token=True)
        for shots, group in by_shots.items():
            names = list(dict.fromkeys(t.lm_eval_task for t in group))  # two metrics, one run
            try:
                raw = lm_eval.simple_evaluate(
                    model=lm, tasks=names, num_fewshot=shots, limit=limit,
                    task_manager=task_manager, log_samples=keep_raw,
                    confirm_run_unsafe_code=allow_code_execution)
            except (ConnectionError, OSError) as err:
                raise EvalError(f"lm-eval could not load the data of {', '.join(names)}: {err}. "
                                "The paper's tasks need the Hugging Face Hub or a filled datasets "
                                "cache (HF_DATASETS_OFFLINE=1)") from err
            except KeyError as err:
                raise EvalError(f"lm-eval does not know a task of {', '.join(names)}: {err}") from err
            results += [TaskResult(t, *_metric(raw, t)) for t in group]
            versions.update({n: raw.get("versions", {}).get(n) for n in names})
            if keep_raw:
                raws.append(raw)
    order = {t.name: i for i, t in enumerate(tasks)}
    results.sort(key=lambda r: order[r.task.name])
    model = {"path": str(source.path), "kind": source.kind,
             "checkpoint_tag": source.checkpoint_tag, "tokens": source.tokens}
    settings = {"device": device, "dtype": dtype, "batch_size": batch_size, "limit": limit,
                "add_bos_token": True, "lm_eval_task_versions": versions}
    return EvalReport(tuple(results), model, getattr(lm_eval, "__version__", ""), settings), raws
