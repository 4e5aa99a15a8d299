"""Where the repository's ``ds_configs/`` and ``examples/`` are: in a checkout, or in a wheel.

This module owns that lookup. A checkout (and the editable install the README uses) reads the
top-level folders; a wheel carries copies under ``megatron_tinyllama/resources/``, which
``setup.py``'s build step puts there, so recipes and DeepSpeed configs are found after a plain
``pip install`` too.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """``ds_configs`` or ``examples``: the checkout's folder when there is one, else the wheel's copy."""
    checkout = _PACKAGE.parent / name
    return checkout if checkout.is_dir() else _PACKAGE / "resources" / name
