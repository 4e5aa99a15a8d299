"""The scaling tools of this stack, one package each, sharing their errors (:mod:`.errors`) and
one reader of a run's ``metrics.jsonl`` (:mod:`.run_metrics`), behind one command
(:mod:`.cli`, ``tinyllama-scaling``):

* The over-training testbed, after Gadre et al. (2024), "Language models scale reliably with
  over-training and on downstream tasks" (the modules here): plan a testbed, fit L(C, M) (Eq. 4)
  and Err(L) (Eq. 5) on the released testbed or on this stack's own runs, and predict larger runs.

  * :mod:`.fit`: the laws and their fits (pure functions on arrays).
  * :mod:`.runs`: reading the released testbed in place and this stack's run folders.
  * :mod:`.protocol`: the paper's fit/check protocol on runs, and fit files.
  * :mod:`.planner`: training recipes for shapes x token multipliers, with their compute.
  * :mod:`.plots`: PNG plots of a fit.

* The loss-curve forecast, after Tissue et al. (2024): :mod:`.forecast` (its own package).
"""

from megatron_tinyllama.scaling.fit import (  # noqa: F401
    ErrorLaw,
    FitError,
    LossLaw,
    ScalingError,
    fit_error_law,
    fit_loss_law,
)
from megatron_tinyllama.scaling.runs import (  # noqa: F401
    RunFileError,
    RunPoint,
    load_stack_run,
    load_testbed,
)
