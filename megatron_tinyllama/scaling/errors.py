"""This module owns the errors both scaling tools (the over-training testbed and the loss-curve
forecast) report to a user: one line each, printed by ``tinyllama-scaling`` with exit status 2."""


class ScalingError(ValueError):
    """Base of every error the scaling toolkit reports to a user (bad input, failed fit)."""


class FitError(ScalingError):
    """Too few or invalid points, or a fit that did not converge to finite parameters."""


class RunFileError(ScalingError):
    """A run file that is missing, unreadable, or lacks a field the fits need (file and line
    named)."""
