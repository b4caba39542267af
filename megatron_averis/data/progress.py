"""A one-line progress report on stderr (tqdm is not a dependency here).

On a terminal the line is redrawn in place a few times a second; in a log
file a new line is written every ``log_every`` seconds instead.
"""

import sys
import time
from typing import Optional, TextIO


def _si(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000.0
    return f"{n:.1f}T"


class Progress:
    def __init__(self, label: str, total_bytes: Optional[int] = None, enabled: bool = True,
                 stream: Optional[TextIO] = None, log_every: float = 10.0):
        self.label, self.total_bytes, self.enabled = label, total_bytes, enabled
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.interval = 0.25 if self.tty else log_every
        self.docs = self.tokens = self.bytes = 0
        self.start = self._last = time.monotonic()

    def restart(self) -> None:
        """Start the clock now (after slow set-up such as imports)."""
        self.start = self._last = time.monotonic()

    def update(self, docs: int = 0, tokens: int = 0, nbytes: int = 0) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._emit(final=False)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        parts = [f"{self.label}: {_si(self.docs)} docs", f"{_si(self.tokens)} tokens",
                 f"{_si(self.bytes)}B"]
        if self.total_bytes:
            parts.append(f"{100.0 * self.bytes / self.total_bytes:5.1f}%")
        parts.append(f"{_si(self.bytes / elapsed)}B/s")
        parts.append(f"{elapsed:.0f}s")
        return ", ".join(parts)

    def _emit(self, final: bool) -> None:
        if self.tty:
            end = "\n" if final else ""
            self.stream.write("\r\033[K" + self.line() + end)
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._emit(final=True)
