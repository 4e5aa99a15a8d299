"""Scaling-law toolkit after Gadre et al. (2024), "Language models scale reliably with over-training
and on downstream tasks": plan an over-training testbed, fit L(C, M) (Eq. 4) and Err(L) (Eq. 5) on
the released testbed or on this stack's own runs, and predict larger runs.

* :mod:`.fit`: the laws and their fits (pure functions on arrays).
* :mod:`.runs`: reading the released testbed in place and this stack's run folders.
* :mod:`.protocol`: the paper's fit/check protocol on runs, and fit files.
* :mod:`.planner`: training recipes for shapes x token multipliers, with their compute.
* :mod:`.curve`: the loss-curve law of Tissue et al. (2024) over a run's LR schedule.
* :mod:`.forecast`: a run's curve forecast from its metrics; :mod:`.forecast_plan`: a planned
  run's curve from small runs (``forecast --plan``).
* :mod:`.plots`: PNG plots. :mod:`.cli`: the ``tinyllama-scaling`` command.
"""

from megatron_tinyllama.scaling.fit import (  # noqa: F401
    ErrorLaw,
    FitError,
    LossLaw,
    ScalingError,
    fit_error_law,
    fit_loss_law,
)
from megatron_tinyllama.scaling.runs import RunFileError, RunPoint, load_stack_run, load_testbed  # noqa: F401
