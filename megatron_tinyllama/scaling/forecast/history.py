"""This module owns reading a run for its loss-curve forecast: the per-step LR schedule of a run
and of the stages planned after it, and the measured points of its ``metrics.jsonl`` (through
:mod:`megatron_tinyllama.scaling.run_metrics`), following ``checkpoint.continue_from`` back through
earlier stages.

The LR of a step still to come is the recipe's, through :func:`megatron_tinyllama.train.schedule.
learning_rate`, exactly as the training loop computes it (the LR of a step is the schedule's value
after the step's tokens), so a stage with another batch size or schedule is forecast with the LR
it will really use. The LR of a step already trained is the one the trainer logged
(:func:`with_logged_lr`): the recipe may have changed since. Records are matched to steps by their
token count, which stays unambiguous across stages and resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from megatron_tinyllama.scaling.errors import FitError, RunFileError
from megatron_tinyllama.scaling.run_metrics import METRICS_FILE, Points, read_run_metrics

MAX_CHAIN = 32
"""Earlier stages followed through ``checkpoint.continue_from`` before giving up (a loop)."""


@dataclass(frozen=True)
class Segment:
    """A stretch of a run with one recipe: its tokens, batch and LR schedule."""

    name: str
    start_tokens: int
    end_tokens: int
    batch_tokens: int
    optimizer: object
    """The stage's :class:`~megatron_tinyllama.config.OptimizerConfig`."""
    schedule_tokens: int
    """``train.train_tokens`` of the stage (the schedule's default decay end)."""


@dataclass(frozen=True)
class Schedule:
    """Every optimizer step of a run: tokens after it, its LR and batch, and its stage."""

    tokens: np.ndarray
    lr: np.ndarray
    step_tokens: np.ndarray
    segment: np.ndarray
    """Index into ``segments`` of each step."""
    segments: tuple[Segment, ...]

    @property
    def reference_tokens(self) -> float:
        """The areas' unit: the first stage's batch."""
        return float(self.segments[0].batch_tokens)

    def index_of(self, tokens: Sequence[float]) -> np.ndarray:
        """Step index (0-based) whose end is at ``tokens`` (the first step at or after it)."""
        idx = np.searchsorted(self.tokens, np.asarray(tokens, dtype=float) - 0.5)
        return np.minimum(idx, self.tokens.size - 1)


def segment_of(cfg, start_tokens: Optional[int] = None, name: Optional[str] = None) -> Segment:
    """The segment a recipe trains: from ``start_tokens`` (default ``train.start_tokens``) to
    ``train.train_tokens``."""
    start = cfg.train.start_tokens if start_tokens is None else int(start_tokens)
    return Segment(name=name or cfg.name, start_tokens=start, end_tokens=cfg.train.train_tokens,
                   batch_tokens=cfg.train.global_batch_tokens, optimizer=cfg.optimizer,
                   schedule_tokens=cfg.train.train_tokens)


def build_schedule(segments: Sequence[Segment], logged_lr: Optional[Points] = None,
                   breaks: Sequence[int] = ()) -> Schedule:
    """Every step of the segments, in order, as the training loop will run them.

    Args:
        segments: the stages, in order.
        logged_lr: the LRs the trainer logged (:attr:`RunHistory.lr`): the steps trained so far
            get them (:func:`with_logged_lr`), the recipe's schedule gives the steps to come.
        breaks: tokens where the recipe may have changed (resumes).

    Raises:
        FitError: no segment, or a segment that would train no step.
    """
    from megatron_tinyllama.train.schedule import learning_rate

    if not segments:
        raise FitError("forecast: no stage to forecast")
    tokens, lr, step_tokens, seg = [], [], [], []
    for i, s in enumerate(segments):
        if s.end_tokens <= s.start_tokens:
            raise FitError(f"forecast: stage {s.name!r} ends at {s.end_tokens:,} tokens, not beyond "
                           f"its start at {s.start_tokens:,}")
        t = s.start_tokens
        while t < s.end_tokens:  # as train/loop.py: run while consumed < train_tokens
            t += s.batch_tokens
            tokens.append(t)
            lr.append(learning_rate(t, s.optimizer, s.schedule_tokens))
            step_tokens.append(s.batch_tokens)
            seg.append(i)
    tokens_arr, lr_arr = np.asarray(tokens, dtype=float), np.asarray(lr, dtype=float)
    if logged_lr is not None and len(logged_lr):
        lr_arr = with_logged_lr(tokens_arr, lr_arr, logged_lr, breaks)[0]
    return Schedule(tokens=tokens_arr, lr=lr_arr,
                    step_tokens=np.asarray(step_tokens, dtype=float), segment=np.asarray(seg),
                    segments=tuple(segments))


def with_logged_lr(tokens: np.ndarray, lr: np.ndarray, logged: Points, breaks: Sequence[int] = ()
                   ) -> tuple[np.ndarray, int, int]:
    """The recipe's LR per step (``lr``, steps ending at ``tokens``) with the steps the trainer
    logged set to the LR it logged: ``(lr, logged steps used, how many of them the recipe gave
    another LR)``.

    The recipe now in ``config.yaml`` need not be the one the past steps ran under: a resume with
    a larger ``train.train_tokens`` stretches the cosine and the recipe rebuilds every past step's
    LR from it (the issue's demo run: 1.41e-3 at step 280 where the trainer used 3.47e-4). A step
    between two logged ones keeps the recipe's LR where the recipe agrees with both logged ones,
    else it is interpolated linearly between them (exact for a linear warm-up or decay, within
    the curvature of a cosine over ``logging.log_interval_steps`` steps). Where a resume
    (``breaks``, tokens) falls between them, the recipe may have changed there: the steps up to it
    keep the earlier logged LR (or the recipe's, where that agreed), those after it the later one.
    Steps before the first logged one, when it disagrees, rise linearly from 0 to it (a warm-up
    from 0).
    """
    t = np.asarray(logged.tokens, dtype=float)
    v = np.asarray(logged.loss, dtype=float)
    idx = np.minimum(np.searchsorted(tokens, t - 0.5), tokens.size - 1)
    on_step = np.abs(tokens[idx] - t) < 0.5  # a record of another batch geometry: not this step
    idx, v = idx[on_step], v[on_step]
    if not idx.size:
        return lr, 0, 0
    agree = np.isclose(lr[idx], v, rtol=1e-6, atol=0.0)
    out = lr.copy()
    cut = np.searchsorted(tokens, np.asarray(sorted(breaks), dtype=float) - 0.5)
    for j in np.flatnonzero(~(agree[:-1] & agree[1:])):
        a, b = idx[j], idx[j + 1]
        inside = cut[(cut >= a) & (cut < b)]
        if inside.size:  # the last step before the resume is inside[-1]
            r = int(inside[-1]) + 1
            if not agree[j]:
                out[a + 1:r] = v[j]
            if not agree[j + 1]:
                out[r:b] = v[j + 1]
        elif b - a > 1:
            out[a + 1:b] = np.interp(np.arange(a + 1, b), [a, b], [v[j], v[j + 1]])
    if not agree[0] and idx[0] > 0:
        out[:idx[0]] = v[0] * np.arange(1, idx[0] + 1) / (idx[0] + 1)
    out[idx] = v
    return out, int(idx.size), int((~agree).sum())


# ---------------------------------------------------------------------------------------------
# Measured points.


def read_points(metrics_path: Union[str, Path]) -> tuple[Points, Points]:
    """(validation, training) losses of a ``metrics.jsonl`` (:func:`~megatron_tinyllama.scaling.
    run_metrics.read_run_metrics`)."""
    metrics = read_run_metrics(metrics_path)
    return metrics.valid, metrics.train


def _continue_dir(cfg, run_dir: Path) -> tuple[Path, Optional[int]]:
    """(previous stage's run folder, tokens at which this stage started from it, if known)."""
    from megatron_tinyllama.checkpoint.training import read_trainer_state, resume_candidates

    source = Path(cfg.checkpoint.continue_from)
    if not source.is_absolute() and not source.exists():
        source = run_dir / source
    state = read_trainer_state(source)
    if state is not None:  # a checkpoint directory inside the previous stage's folder
        return source.parent, int(state["consumed_tokens"])
    candidates = resume_candidates(source) if source.is_dir() else []
    state = read_trainer_state(candidates[0]) if candidates else None
    return source, (int(state["consumed_tokens"]) if state else None)


@dataclass
class RunHistory:
    """A run and the earlier stages it continues: segments trained so far and measured points."""

    segments: list[Segment]
    valid: Points
    """Validation losses on the last stage's validation set (earlier sets are left out)."""
    train: Points
    config: object
    """The last stage's JobConfig."""
    run_dir: Path
    lr: Points = field(default_factory=Points)
    """The LR of each logged training step, as the trainer logged it (:func:`with_logged_lr`)."""
    notes: list[str] = field(default_factory=list)
    """What reading the run changed or left out (another validation set), said once."""
    non_finite: dict[str, list[str]] = field(default_factory=dict)
    """Per loss key, one line per metrics file naming its non-finite losses (left out)."""
    breaks: list[int] = field(default_factory=list)
    """Tokens where the recipe may have changed: resumes and stage starts."""

    def points(self) -> tuple[Points, str]:
        """Validation losses, or training losses where the run has no validation at all."""
        if len(self.valid):
            return self.valid, "valid_loss"
        return self.train, "train_loss"

    def schedule(self, extra: Sequence[Segment] = ()) -> Schedule:
        """:func:`build_schedule` of the segments trained and ``extra`` ones, with the LRs the
        trainer logged for the steps trained."""
        return build_schedule([*self.segments, *extra], self.lr, self.breaks)


def load_history(run_dir: Union[str, Path], *, start_tokens: Optional[int] = None) -> RunHistory:
    """Read a run folder (``config.yaml`` + ``metrics.jsonl``) and the stages before it.

    Args:
        run_dir: the run's ``checkpoint.save_dir``.
        start_tokens: where this run started when known (the live trainer knows it); else from
            the ``continue_from`` checkpoint's state.

    Raises:
        RunFileError: a missing or invalid config.yaml or metrics.jsonl, or a chain of
            ``continue_from`` stages longer than :data:`MAX_CHAIN`.
    """
    from megatron_tinyllama.config import ConfigError, load_config

    chain: list[tuple[Path, object, Optional[int]]] = []
    here, seen = Path(run_dir), set()
    while True:
        if here.is_file():
            here = here.parent
        config_path = here / "config.yaml"
        if not config_path.is_file():
            raise RunFileError(f"{config_path}: missing (a run folder holds config.yaml and "
                               "metrics.jsonl)")
        try:
            cfg = load_config(config_path)
        except ConfigError as err:
            raise RunFileError(f"{config_path}: not a valid JobConfig: {err}") from None
        if here.resolve() in seen or len(chain) >= MAX_CHAIN:
            raise RunFileError(f"{config_path}: checkpoint.continue_from chain loops or is longer "
                               f"than {MAX_CHAIN} stages")
        seen.add(here.resolve())
        if not cfg.checkpoint.continue_from:
            chain.append((here, cfg, None))
            break
        previous, started = _continue_dir(cfg, here)
        chain.append((here, cfg, started))
        here = previous
    chain.reverse()  # first stage first

    # The curve goes on through stages evaluated on one validation set; a stage on another set
    # (data.valid_blend) measures another loss, so the curve restarts there.
    last_blend = chain[-1][1].data.valid_blend
    same_set_from = len(chain)
    while same_set_from > 0 and chain[same_set_from - 1][1].data.valid_blend == last_blend:
        same_set_from -= 1
    segments, valid, train, lr = [], Points(), Points(), Points()
    notes: list[str] = []
    non_finite: dict[str, list[str]] = {}
    dropped, breaks = 0, []
    for i, (folder, cfg, started) in enumerate(chain):
        metrics = read_run_metrics(folder / METRICS_FILE)
        v, t, r = metrics.valid, metrics.train, metrics.lr
        if i + 1 < len(chain):  # this stage is cut where the next one started from it
            nxt = chain[i + 1][2]
            if i + 2 == len(chain) and start_tokens is not None:
                nxt = start_tokens
            end = nxt if nxt is not None else (v.tokens[-1] if len(v) else
                                               t.tokens[-1] if len(t) else cfg.train.train_tokens)
            v, t, r = v.until_tokens(end), t.until_tokens(end), r.until_tokens(end)
        else:
            end = cfg.train.train_tokens
        begin = segments[-1].end_tokens if segments else cfg.train.start_tokens
        segments.append(Segment(name=cfg.name, start_tokens=begin, end_tokens=end,
                                batch_tokens=cfg.train.global_batch_tokens,
                                optimizer=cfg.optimizer, schedule_tokens=cfg.train.train_tokens))
        if i < same_set_from:
            dropped, v = dropped + len(v), Points()
        elif i == same_set_from and i > 0:
            before = chain[i - 1][1].data.valid_blend
            notes.append(
                f"stage {cfg.name!r} ({folder}) evaluates on another validation set "
                f"(data.valid_blend {list(before)} -> {list(last_blend)}): its loss is on another "
                f"scale, so the validation curve starts again at {begin:,} tokens and the "
                f"{dropped} validation point(s) before it are not fitted")
        for key in ("valid_loss", "train_loss"):
            if metrics.non_finite_note(key):
                non_finite.setdefault(key, []).append(metrics.non_finite_note(key))
        breaks += [begin, *metrics.resumes]
        for pts, dst in ((v, valid), (t, train), (r, lr)):
            for tok, step, value in zip(pts.tokens, pts.steps, pts.loss):
                dst.add(tok, step, value)
    return RunHistory(segments=segments, valid=valid, train=train, config=chain[-1][1],
                      run_dir=Path(run_dir), lr=lr, notes=notes, non_finite=non_finite,
                      breaks=breaks)


def load_recipes(recipes: Sequence[Union[str, Path]]) -> list:
    """The recipe files of planned stages, each error naming its file (:class:`RunFileError`)."""
    from megatron_tinyllama.config import ConfigError, load_config

    stages = []
    for recipe in recipes:
        try:
            stages.append(load_config(recipe))
        except ConfigError as err:
            raise RunFileError(f"{recipe}: not a valid recipe: {err}") from None
        except OSError as err:
            raise RunFileError(f"{recipe}: cannot read ({err.strerror})") from None
    return stages
