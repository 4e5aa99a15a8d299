"""Downstream evaluation as the TinyLlama paper reports it, through lm-evaluation-harness.

``suites`` names what runs (lm-eval tasks, shots, metrics), ``paper_results`` holds the published
numbers with their sources, ``harness`` runs lm-eval on an HF directory or a run's checkpoint,
``report`` writes and reads the results JSON and prints the table, ``cli`` is ``tinyllama-eval``.
"""
