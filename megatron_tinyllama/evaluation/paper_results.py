"""This module owns the TinyLlama paper's published evaluation numbers and where each comes from.

Zhang, Zeng, Wang, Lu (2024), "TinyLlama: An Open-Source Small Language Model", arXiv:2401.02385v2
(the version that adds TinyLlama v1.1). Numbers are percentages exactly as printed; table numbers
follow the LaTeX source's order (1 architecture, 2 training speed, 3 commonsense, 4 InstructEval,
5 Chinese). They were transcribed from the paper's LaTeX source as stored in
github.com/BaochaiXue/in-context-RL-papers-reading (commit 9eaa49c8bd0e,
``papers/TinyLlama An Open-Source Small Language Model/main.tex``) and cross-checked where another
copy exists:

* Table 3, all four rows: identical in the TinyLlama_v1.1 model card's "Eval" table
  (huggingface.co/TinyLlama/TinyLlama_v1.1, README.md), and the v1.0 row in
  jzhang38/TinyLlama EVAL.md (row "TinyLlama-1.1B-intermediate-step-1431k-3T").
* Tables 4 and 5: no second copy was found; the printed averages agree with the per-task numbers
  (a test checks it), which catches transcription slips but not a wrong source.

Only the four TinyLlama models are kept; the paper's baselines (OPT-1.3B, Pythia) are not.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

PAPER = "Zhang et al. 2024, TinyLlama, arXiv:2401.02385v2"

TABLE_SOURCES: Mapping[str, str] = MappingProxyType({
    "commonsense": f"{PAPER}, Table 3 'Zero-shot performance on commonsense reasoning tasks'",
    "instructeval": f"{PAPER}, Table 4 'Performance of problem-solving tasks on the InstructEval "
                    "Benchmark'",
    "chinese": f"{PAPER}, Table 5 'Zero-shot performance on Chinese understanding tasks'",
})

MODELS: tuple[str, ...] = (
    "TinyLlama v1.0", "TinyLlama v1.1", "TinyLlama v1.1 Math&Code", "TinyLlama v1.1 Chinese")
"""Column order of the printed table. v1.0 is the 3T-token model (step 1431k)."""


def _rows(tasks: tuple[str, ...], values: dict[str, tuple[float, ...]]) -> Mapping:
    return MappingProxyType({model: MappingProxyType(dict(zip(tasks, row)))
                             for model, row in values.items()})


_COMMONSENSE = ("hellaswag", "openbookqa", "winogrande", "arc_challenge", "arc_easy", "boolq",
                "piqa")
_INSTRUCTEVAL = ("mmlu", "bbh", "humaneval", "drop")
_CHINESE = ("xwinograd_zh", "xstorycloze_zh", "xnli_zh", "xcopa_zh")

RESULTS: Mapping[str, Mapping[str, Mapping[str, float]]] = MappingProxyType({
    # Table 3: HellaSwag, Obqa, WinoGrande, ARC-c, ARC-e, boolq, piqa (acc_norm where the harness
    # has it, per the repository's EVAL.md "We report the acc_norm by default").
    "commonsense": _rows(_COMMONSENSE, {
        "TinyLlama v1.0": (59.20, 36.00, 59.12, 30.12, 55.25, 57.83, 73.29),
        "TinyLlama v1.1": (61.47, 36.80, 59.43, 32.68, 55.47, 55.99, 73.56),
        "TinyLlama v1.1 Math&Code": (60.80, 36.40, 60.22, 33.87, 55.20, 57.09, 72.69),
        "TinyLlama v1.1 Chinese": (58.23, 35.20, 59.27, 31.40, 55.35, 61.41, 73.01),
    }),
    # Table 4: MMLU 5-shot, BBH 3-shot, HumanEval 0-shot, DROP 3-shot (InstructEval's scripts).
    "instructeval": _rows(_INSTRUCTEVAL, {
        "TinyLlama v1.0": (25.34, 29.65, 9.15, 15.34),
        "TinyLlama v1.1": (26.58, 29.27, 6.71, 15.21),
        "TinyLlama v1.1 Math&Code": (24.60, 26.35, 15.24, 18.54),
        "TinyLlama v1.1 Chinese": (26.35, 30.04, 4.88, 15.75),
    }),
    # Table 5: xwinograd_zh, xstorycloze_zh, xnli_zh, xcopa_zh, all 0-shot.
    "chinese": _rows(_CHINESE, {
        "TinyLlama v1.0": (68.45, 54.53, 33.69, 56.80),
        "TinyLlama v1.1": (55.75, 47.98, 34.70, 51.40),
        "TinyLlama v1.1 Math&Code": (63.69, 56.32, 33.57, 57.00),
        "TinyLlama v1.1 Chinese": (74.20, 60.29, 33.77, 65.20),
    }),
})

AVERAGES: Mapping[str, Mapping[str, float]] = MappingProxyType({
    # The "Avg"/"Avg." column of each table, as printed.
    "commonsense": MappingProxyType({"TinyLlama v1.0": 52.99, "TinyLlama v1.1": 53.63,
                                     "TinyLlama v1.1 Math&Code": 53.75,
                                     "TinyLlama v1.1 Chinese": 53.41}),
    "instructeval": MappingProxyType({"TinyLlama v1.0": 19.87, "TinyLlama v1.1": 19.44,
                                      "TinyLlama v1.1 Math&Code": 21.18,
                                      "TinyLlama v1.1 Chinese": 19.26}),
    "chinese": MappingProxyType({"TinyLlama v1.0": 53.37, "TinyLlama v1.1": 47.46,
                                 "TinyLlama v1.1 Math&Code": 52.64,
                                 "TinyLlama v1.1 Chinese": 58.37}),
})


def paper_value(suite: str, task: str, model: str) -> float | None:
    """The published percentage for ``task`` of ``suite`` and ``model``, or None if not reported."""
    return RESULTS.get(suite, {}).get(model, {}).get(task)
