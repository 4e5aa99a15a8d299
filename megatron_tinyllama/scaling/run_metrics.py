"""This module owns reading a run's ``metrics.jsonl`` (written by :mod:`megatron_tinyllama.train.
metrics`): the one reader of its records for the curve forecast (:mod:`.forecast`, the live check)
and the over-training fits (:mod:`.runs`).

A record is a JSON object per line. Training records carry ``step``, ``tokens``, ``train_loss``
and the ``lr`` the step used; evaluation records ``step``, ``tokens`` and ``valid_loss``; events
(a resume) carry ``event``. A record at or before an earlier one's tokens comes from a resume that
went back to an earlier checkpoint and supersedes the records it replays. A non-finite loss (a
skipped step, a diverged evaluation) is not a point: its line is kept so that the tools can say
which points they left out rather than drop them without a word.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

from megatron_tinyllama.scaling.errors import RunFileError

METRICS_FILE = "metrics.jsonl"


@dataclass
class Points:
    """Measured values of a run, in token order, one per token count (later records win)."""

    tokens: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    """The value at each point: a loss (or, for :attr:`RunMetrics.lr`, the learning rate)."""

    def add(self, tokens: int, step: int, loss: float) -> None:
        # A record at or before the last one's tokens comes from a resume that went back to an
        # earlier checkpoint: it supersedes the records it replays.
        while self.tokens and self.tokens[-1] >= tokens:
            self.tokens.pop(), self.steps.pop(), self.loss.pop()
        self.tokens.append(tokens), self.steps.append(step), self.loss.append(loss)

    def until_tokens(self, limit: float) -> "Points":
        keep = [i for i, t in enumerate(self.tokens) if t <= limit]
        return Points([self.tokens[i] for i in keep], [self.steps[i] for i in keep],
                      [self.loss[i] for i in keep])

    def after_tokens(self, limit: float) -> "Points":
        keep = [i for i, t in enumerate(self.tokens) if t > limit]
        return Points([self.tokens[i] for i in keep], [self.steps[i] for i in keep],
                      [self.loss[i] for i in keep])

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class RunMetrics:
    """What a ``metrics.jsonl`` says about a run's curve."""

    path: Path
    valid: Points
    train: Points
    lr: Points
    """The LR each logged training step used (``loss`` holds it), as the trainer logged it."""
    resumes: tuple[int, ...]
    """Tokens at which the run resumed (``{"event": "resume"}`` records): the recipe, and so
    the LR schedule, may change there."""
    non_finite: dict[str, tuple[int, ...]]
    """Per loss key (``valid_loss``, ``train_loss``): the lines (1-based) whose value was NaN or
    infinite, left out of the points."""

    def non_finite_note(self, key: str) -> str:
        """One line naming the lines whose ``key`` was not finite ('' when none)."""
        lines = self.non_finite.get(key, ())
        if not lines:
            return ""
        shown = ", ".join(str(n) for n in lines[:12]) + (", ..." if len(lines) > 12 else "")
        return (f"{self.path}: {len(lines)} non-finite {key} value(s) left out (line(s) {shown}): "
                "a diverged evaluation or a skipped step")


def is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def iter_records(path: Union[str, Path], *, cut_last_line_ok: bool = True
                 ) -> Iterator[tuple[int, object]]:
    """``(line number, parsed JSON)`` of each non-blank line of ``path``.

    Args:
        cut_last_line_ok: pass over a last line that is not JSON (a run killed, or still writing,
            mid-line) instead of refusing it.

    Raises:
        RunFileError: the file cannot be read, or a line is not JSON (naming file and line).
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise RunFileError(f"{path}: cannot read ({err.strerror})") from None
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == last and cut_last_line_ok:
                continue
            raise RunFileError(f"{path}:{i + 1}: not valid JSON ({err.msg})") from None
        yield i + 1, record


def read_run_metrics(path: Union[str, Path]) -> RunMetrics:
    """The validation and training losses and the logged LRs of a ``metrics.jsonl``.

    Only records with a numeric ``step`` and ``tokens`` count; events (a resume) are passed over,
    non-finite losses are listed in :attr:`RunMetrics.non_finite`, a cut last line is ignored.

    Raises:
        RunFileError: see :func:`iter_records`.
    """
    path = Path(path)
    valid, train, lr = Points(), Points(), Points()
    non_finite: dict[str, list[int]] = {"valid_loss": [], "train_loss": []}
    resumes: list[int] = []
    for line, record in iter_records(path):
        if not isinstance(record, dict) or not is_number(record.get("step")) \
                or not is_number(record.get("tokens")):
            continue
        if "event" in record:
            if record["event"] == "resume":
                resumes.append(int(record["tokens"]))
            continue
        tokens, step = int(record["tokens"]), int(record["step"])
        for key, points in (("valid_loss", valid), ("train_loss", train)):
            value = record.get(key)
            if is_number(value):
                points.add(tokens, step, float(value))
            elif isinstance(value, float):  # NaN or inf: json.loads reads both
                non_finite[key].append(line)
        if is_number(record.get("lr")) and "train_loss" in record:
            lr.add(tokens, step, float(record["lr"]))
    return RunMetrics(path=path, valid=valid, train=train, lr=lr, resumes=tuple(resumes),
                      non_finite={k: tuple(v) for k, v in non_finite.items() if v})
