"""The loss-curve forecast tool: "is this run on track?" The curve law of Tissue et al. (2024)
fitted on a run's own ``metrics.jsonl`` over the LR of every step, forecasting the rest of the run
and of the stages planned after it, with a band and the caveats of its fit; the trainer's live
check (:mod:`megatron_tinyllama.train.forecast_live`) runs it at every evaluation.

* :mod:`.law`: the law, its learning-rate areas, its fit and bootstrap band (pure functions).
* :mod:`.history`: a run's schedule and measured points, through earlier stages.
* :mod:`.predict`: the forecast of a run (points fitted, band, checks against later points).
* :mod:`.trust`: the caveats of a fit and the law's own uncertainty in the band.
* :mod:`.plan`: a planned bigger run's curve from small runs (``forecast --plan``).
* :mod:`.published`: the checks on the published 25M-400M runs (``forecast-published``).
* :mod:`.plots`: the ``--png`` picture. :mod:`.cli`: the two subcommands of ``tinyllama-scaling``.

The over-training testbed tool (L(C, M), Err(L)) is the rest of :mod:`megatron_tinyllama.scaling`;
both read a run's metrics with :mod:`megatron_tinyllama.scaling.run_metrics`.
"""
