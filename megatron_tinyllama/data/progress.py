"""Progress line for long data jobs: documents/s, tokens/s and input bytes/s, with an ETA.

This module owns only the display. On a terminal the line is redrawn in place; otherwise (logs,
CI) one line is printed per update. Updates come every ``interval_docs`` documents.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def human(value: float, unit: str = "") -> str:
    """``1234567 -> '1.23M'``: about three significant digits and a k/M/G/T suffix."""
    suffixes = ("", "k", "M", "G", "T")
    rank = 0
    while abs(value) >= 999.5 and rank < len(suffixes) - 1:
        value /= 1000.0
        rank += 1
    digits = 0 if abs(value) >= 99.5 or (rank == 0 and value == int(value)) else \
        1 if abs(value) >= 9.95 else 2
    return f"{value:.{digits}f}{suffixes[rank]}{unit}"


class Progress:
    """Throughput display for a job that reads ``total_bytes`` of input.

    Args:
        total_bytes: Input size, for the percentage and ETA (0 if unknown).
        interval_docs: Redraw after this many more documents.
        stream: Where to write (stderr by default).
        enabled: False turns the display off (the counters still run).
    """

    def __init__(self, total_bytes: int, interval_docs: int = 10000,
                 stream: Optional[TextIO] = None, enabled: bool = True) -> None:
        self.total_bytes = total_bytes
        self.interval_docs = max(1, interval_docs)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.docs = self.tokens = self.bytes = 0
        self._next_docs = self.interval_docs
        self._drawn = False

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        """Add work done since the last call; redraw when the interval is crossed."""
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        if self.docs >= self._next_docs:
            self._next_docs = (self.docs // self.interval_docs + 1) * self.interval_docs
            self.draw()

    def line(self) -> str:
        """The current progress text."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        parts = []
        if self.total_bytes:
            fraction = min(1.0, self.bytes / self.total_bytes)
            width = 20
            bar = "#" * int(fraction * width) + "." * (width - int(fraction * width))
            eta = (elapsed / fraction - elapsed) if fraction > 0 else 0.0
            parts.append(f"[{bar}] {100 * fraction:5.1f}% ETA {_clock(eta)}")
        parts.append(f"{human(self.docs)} docs ({human(self.docs / elapsed)}/s)")
        parts.append(f"{human(self.tokens)} tok ({human(self.tokens / elapsed)}/s)")
        parts.append(f"{human(self.bytes, 'B')} ({human(self.bytes / elapsed, 'B')}/s)")
        parts.append(_clock(elapsed))
        return " | ".join(parts)

    def draw(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Draw the final state and end the line."""
        if not self.enabled:
            return
        self.draw()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
