"""What a person sees in the terminal: known third-party noise is hidden unless asked for.

This module owns the list of messages that megatron-core, torch and DeepSpeed print on every run of
this stack and that say nothing about the job (optional CUDA libraries that are not installed and
not used by our path, deprecations inside those libraries, the launcher's own bookkeeping), and the
switch that shows everything: ``TINYLLAMA_VERBOSE=1`` in the environment (``tinyllama-demo
--verbose`` sets it for its ranks). Only exact known messages are hidden; any other warning still
shows. :func:`hide_known_noise` silences them at the source (Python warnings and log records);
:class:`NoiseFilter` recognises them in the output of a subprocess.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

VERBOSE_ENV = "TINYLLAMA_VERBOSE"
"""Set to 1 to show every message, known noise included."""

# Python warnings, as regular expressions matched at the start of the message.
KNOWN_WARNINGS: tuple[str, ...] = (
    # megatron-core, on import: the TE/apex fused kernels it would use on GPU (our path does not
    # use megatron-core's optimizer, FSDP or fused norms on CPU).
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed\. Falling back to Torch Norm",
    # megatron-core's TransformerConfig default, which we do not set.
    r"full scope is deprecated\. Use empty cuda_graph_scope",
    # megatron-core's own call sites under our TP layers.
    r"Warning: tp_group is None, using default tp group",
    # torch, on DeepSpeed's ZeRO-3 collectives (DeepSpeed's call, not ours).
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
    # megatron-core's GPTDataset when the tokenizer has no pad id of its own: it then picks an id
    # outside the vocabulary itself; our samples are packed and never padded.
    r"The pad token id in the tokenizer collides with another special token id\. .*the training "
    r"flow will avoid masking out any pad tokens",
)

# Log records (logging module), matched at the start of the message.
KNOWN_LOG_MESSAGES: tuple[str, ...] = (
    r"Using Megatron-FSDP without Transformer Engine",
    r"Detected Megatron Core, using Megatron-FSDP with Megatron",
)

# The deepspeed launcher's INFO lines in a subprocess's output (the command, the world info,
# "exits successfully").
_LAUNCHER_INFO = re.compile(
    r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[INFO\] \[(runner|launch)\.py:\d+:main\] ")
# "path.py:12: UserWarning: message", then the warning's source line indented by two spaces.
_WARNING_LINE = re.compile(r"^\S+\.py:\d+: \w*Warning: (?P<message>.*)$")
_WARNING_SOURCE = re.compile(r"^  \S")
_KNOWN = re.compile("|".join(f"(?:{p})" for p in KNOWN_WARNINGS + KNOWN_LOG_MESSAGES))
_KNOWN_LOG = re.compile("|".join(KNOWN_LOG_MESSAGES))


def verbose() -> bool:
    """Whether the user asked to see everything (``TINYLLAMA_VERBOSE`` set and not 0)."""
    return os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0")


class _KnownNoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _KNOWN.match(record.getMessage())


def hide_known_noise() -> None:
    """Ignore the known warnings and log records in this process (nothing when verbose).

    Call after logging is configured: the filter goes on the root logger's handlers, which see
    the records of every logger that propagates to them.
    """
    if verbose():
        return
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _KnownNoiseFilter) for f in handler.filters):
            handler.addFilter(_KnownNoiseFilter())


class NoiseFilter:
    """Recognises known noise line by line in a subprocess's output (one instance per stream: a
    known warning's source line, printed on the next line, is noise too)."""

    def __init__(self) -> None:
        self._after_known_warning = False

    def is_noise(self, line: str) -> bool:
        line = line.rstrip("\n")
        after_known_warning, self._after_known_warning = self._after_known_warning, False
        if after_known_warning and _WARNING_SOURCE.match(line):
            return True
        warning = _WARNING_LINE.match(line)
        if warning:
            self._after_known_warning = bool(_KNOWN.match(warning["message"]))
            return self._after_known_warning
        # A log line: the message follows the logger's own prefix.
        return bool(_LAUNCHER_INFO.match(line) or _KNOWN_LOG.search(line))
