"""Testbed planner: training recipes for model shapes x token multipliers, and their compute.

The over-training testbed trains each shape N at several token multipliers ``M = D/N``
(5 … 640; M = 20 is about compute-optimal) with the same recipe per shape. Here a recipe is a
:class:`~megatron_tinyllama.config.JobConfig` for this stack: ``model.preset`` the shape,
``train.train_tokens = M·N``, and batch, warm-up, peak and final learning rate, weight decay,
z-loss and qk-norm from the released hyperparameters of that shape (read from the testbed, not
copied into this repository) or given explicitly.

N is this stack's ``ModelConfig.num_parameters()``: megatron-core's LayerNorm carries a bias that
open_lm's gain-only LayerNorm lacks, so N here is larger than the testbed's ``params`` by
``2·d`` per norm (0.02% for the 11M shape); D, and so C = 6·N·D, follow this N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from megatron_tinyllama.config import JobConfig, config_from_dict, save_config
from megatron_tinyllama.model.presets import get_preset
from megatron_tinyllama.scaling.fit import ScalingError
from megatron_tinyllama.scaling.runs import RunPoint, preset_for_shape

TESTBED_PRESETS = (
    "testbed-d96-l8-h4",
    "testbed-d512-l8-h4",
    "testbed-d576-l24-h8",
    "testbed-d1024-l24-h8",
)
PAPER_MULTIPLIERS = (5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class PlanError(ScalingError):
    """A recipe that cannot be planned (unknown preset, missing hyperparameters, bad multiplier)."""


@dataclass(frozen=True)
class RecipeHyperparams:
    """Optimisation recipe of one shape, as in the testbed's released hyperparameters."""

    global_batch_size: int
    """Sequences per optimizer step (open_lm ``global_bs``)."""
    warmup_steps: int
    lr: float
    min_lr: float
    """Final learning rate of the cosine schedule (open_lm ``cd``, --lr-cooldown-end)."""
    weight_decay: float
    z_loss_weight: float
    qk_layernorm: bool
    source: str = "explicit"
    """Where the values came from (a testbed file, or 'explicit')."""
    notes: tuple[str, ...] = ()
    """Disagreements found while reading them."""


@dataclass(frozen=True)
class TestbedRecipe:
    """One planned run: a loadable JobConfig plus its scaling-law coordinates."""

    name: str
    preset: str
    multiplier: float
    params: int
    """N of this stack's model (LayerNorm biases included)."""
    tokens: int
    compute: float
    """C = 6·N·D FLOPs."""
    config: JobConfig
    hyperparams: RecipeHyperparams


def _launch_flag(args: Sequence[str], flag: str) -> Optional[str]:
    for i, arg in enumerate(args[:-1]):
        if arg == flag:
            return args[i + 1]
    return None


def hyperparams_from_testbed(runs: Sequence[RunPoint], preset: str) -> RecipeHyperparams:
    """The released recipe of the testbed shape behind ``preset``.

    Reads the ``hyperparameters`` of the shape's runs (the M = 20 RedPajama run first). The
    6.9B files list ``global_bs = 1``, a placeholder; where a run's launch command
    (``--global-batch-size``) disagrees with ``global_bs``, the launch command wins and a note
    says so.

    Raises:
        PlanError: the testbed has no run of this shape.
    """
    shape_runs = [r for r in runs if preset_for_shape(r.shape) == preset and r.hyperparameters]
    if not shape_runs:
        raise PlanError(
            f"no testbed run has the shape of preset {preset!r}; give the recipe explicitly "
            "(--global-batch-size, --warmup-steps, --lr, ...)"
        )
    shape_runs.sort(key=lambda r: (r.dataset != "rpj", abs(math.log(r.multiplier / 20.0))))
    run = shape_runs[0]
    hp = run.hyperparameters
    notes = []
    try:
        batch = int(hp["global_bs"])
        launch_batch = _launch_flag(run.launch_args, "--global-batch-size")
        if launch_batch is not None and int(launch_batch) != batch:
            notes.append(
                f"{Path(run.source).name}: global_bs={batch} but launched with "
                f"--global-batch-size {launch_batch}; using {launch_batch}"
            )
            batch = int(launch_batch)
        return RecipeHyperparams(
            global_batch_size=batch,
            warmup_steps=int(hp["warmup"]),
            lr=float(hp["lr"]),
            min_lr=float(hp["cd"]),
            weight_decay=float(hp["wd"]),
            z_loss_weight=float(hp.get("z_loss", 0.0)),
            qk_layernorm=bool(hp.get("qk_norm", False)),
            source=run.source,
            notes=tuple(notes),
        )
    except KeyError as err:
        raise PlanError(f"{run.source}: missing field 'hyperparameters.{err.args[0]}'") from None


def plan_recipe(
    preset: str,
    multiplier: float,
    hyperparams: RecipeHyperparams,
    *,
    overrides: Sequence[str] = (),
    save_root: str = "runs",
) -> TestbedRecipe:
    """A recipe training ``preset`` on ``multiplier · N`` tokens.

    Args:
        preset: a model preset of this stack (any, not only the testbed's).
        multiplier: M = D/N.
        hyperparams: batch, warm-up, learning rates, weight decay, z-loss, qk-norm.
        overrides: ``section.field=value`` applied last (e.g. ``data.blend=...``).
        save_root: checkpoints go to ``<save_root>/<name>``, where ``fit --runs`` reads them.

    Raises:
        PlanError: unknown preset, non-positive multiplier, or an invalid resulting config.
    """
    from megatron_tinyllama.config import ConfigError

    if not (multiplier > 0 and math.isfinite(multiplier)):
        raise PlanError(f"token multiplier must be positive, got {multiplier}")
    try:
        model = get_preset(preset)
    except ConfigError as err:
        raise PlanError(str(err)) from None
    params = model.num_parameters()
    tokens = int(round(multiplier * params))
    batch_tokens = hyperparams.global_batch_size * model.seq_length
    name = f"{preset}-M{multiplier:g}"
    tree = {
        "name": name,
        "model": {
            "preset": preset,
            "z_loss_weight": hyperparams.z_loss_weight,
            "qk_layernorm": hyperparams.qk_layernorm,
        },
        "optimizer": {
            "lr": hyperparams.lr,
            "min_lr": hyperparams.min_lr,
            "warmup_tokens": hyperparams.warmup_steps * batch_tokens,
            "schedule": "cosine",
            "weight_decay": hyperparams.weight_decay,
            "beta2": 0.95,  # open_lm --beta2 0.95 in every testbed launch
            "grad_clip": 1.0,
        },
        "train": {"train_tokens": tokens, "global_batch_tokens": batch_tokens, "precision": "bf16"},
        "checkpoint": {"save_dir": f"{save_root}/{name}"},
    }
    try:
        cfg = config_from_dict(tree, list(overrides), source=name)
    except ConfigError as err:
        raise PlanError(str(err)) from None
    return TestbedRecipe(
        name=name,
        preset=preset,
        multiplier=float(multiplier),
        params=params,
        tokens=cfg.train.train_tokens,
        compute=6.0 * params * cfg.train.train_tokens,
        config=cfg,
        hyperparams=hyperparams,
    )


def plan_testbed(
    presets: Iterable[str],
    multipliers: Iterable[float],
    hyperparams: Mapping[str, RecipeHyperparams],
    *,
    overrides: Sequence[str] = (),
    save_root: str = "runs",
) -> list[TestbedRecipe]:
    """Recipes for every preset x multiplier, ordered by compute."""
    multipliers = list(multipliers)
    recipes = []
    for preset in presets:
        if preset not in hyperparams:
            raise PlanError(f"no hyperparameters for preset {preset!r}")
        for mult in multipliers:
            recipes.append(
                plan_recipe(
                    preset, mult, hyperparams[preset], overrides=overrides, save_root=save_root
                )
            )
    return sorted(recipes, key=lambda r: r.compute)


def plan_summary(recipes: Sequence[TestbedRecipe], gpu_flops: Optional[float] = None) -> str:
    """A table of the plan and its total compute.

    Args:
        recipes: the planned runs.
        gpu_flops: sustained FLOP/s per GPU (peak x MFU); adds a GPU-hours column when given.
    """
    header = f"{'recipe':34s} {'N (ours)':>12s} {'M':>6s} {'D tokens':>12s} {'C FLOPs':>10s}"
    if gpu_flops:
        header += f" {'GPU-h':>9s}"
    lines = [header, "-" * len(header)]
    for r in recipes:
        line = f"{r.name:34s} {r.params:12,d} {r.multiplier:6g} {r.tokens:12.4g} {r.compute:10.3e}"
        if gpu_flops:
            line += f" {r.compute / gpu_flops / 3600:9.1f}"
        lines.append(line)
    total = sum(r.compute for r in recipes)
    lines.append("-" * len(header))
    tail = f"total: {len(recipes)} runs, C = {total:.3e} FLOPs ({total / 8.64e19:.3g} PF-days)"
    if gpu_flops:
        tail += f", {total / gpu_flops / 3600:.1f} GPU-hours at {gpu_flops:.3g} FLOP/s"
    lines.append(tail)
    lines.append(
        "N is this stack's parameter count; for the testbed shapes it is slightly above "
        "open_lm's 'params' (megatron-core's LayerNorm has a bias, open_lm's is gain-only); "
        "D = M*N and C = 6ND follow it."
    )
    notes = sorted({n for r in recipes for n in r.hyperparams.notes})
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


def save_plan(
    recipes: Sequence[TestbedRecipe], out_dir: Union[str, Path], summary: str = ""
) -> list[Path]:
    """Write one ``<name>.yaml`` per recipe (loadable with ``load_config``) and ``plan.txt``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for r in recipes:
        path = out_dir / f"{r.name}.yaml"
        save_config(r.config, path)
        written.append(path)
    if summary:
        (out_dir / "plan.txt").write_text(summary + "\n")
    return written


def with_explicit(hp: Optional[RecipeHyperparams], **given) -> RecipeHyperparams:
    """``hp`` with the non-None ``given`` fields replaced.

    Without ``hp`` (a preset the testbed lacks), batch and warm-up must be given; the rest default
    to the values the testbed shares up to 1.4B (lr 3e-3 → 3e-5, wd 0.033, z-loss 1e-4, qk-norm).
    """
    given = {k: v for k, v in given.items() if v is not None}
    if hp is not None:
        return replace(hp, **given, source=f"{hp.source} + explicit") if given else hp
    missing = [f for f in ("global_batch_size", "warmup_steps") if f not in given]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise PlanError(f"no testbed recipe for this preset; give {flags}")
    defaults = dict(lr=3e-3, min_lr=3e-5, weight_decay=0.033, z_loss_weight=1e-4, qk_layernorm=True)
    return RecipeHyperparams(**{**defaults, **given})
