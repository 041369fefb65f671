"""A progress bar on stderr (stdout keeps the table and the JSON line).

On a terminal the bar redraws in place; otherwise (CI, the test suite) one line per phase and
one per finished step, so that logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    def __init__(self, estimate_s: float, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.estimate = estimate_s
        self.label = ""
        self._drawn = 0.0
        self._last = (0, 1)

    def phase(self, label: str) -> None:
        self.label = label
        if self.tty:
            self._drawn = 0.0
            self.update(0, 1)
        else:
            self._line(label)

    def update(self, done: int, total: int) -> None:
        if not self.tty:
            return
        self._last = (done, total)
        now = time.monotonic()
        if now - self._drawn < 0.2 and done < total:
            return
        self._drawn = now
        share = min(1.0, done / total) if total else 0.0
        bar = "#" * int(share * 30)
        elapsed = now - self.started
        self.stream.write(
            f"\r[{bar:<30}] {share:4.0%} {self.label:<44.44} "
            f"{_clock(elapsed)} of ~{_clock(self.estimate)}\x1b[K"
        )
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        self._line(text)
        if self.tty:
            self._drawn = 0.0
            self.update(*self._last)

    def _line(self, text: str) -> None:
        self.stream.write(f"[{_clock(time.monotonic() - self.started)}] {text}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
