"""Progress of a run: a bar redrawn in place on a terminal, one line every N steps otherwise.

A tqdm bar written to a file or a pipe leaves one line per redraw (and another for every postfix
change); there, this prints ``<desc> step k/n  loss x  elapsed / left`` every ``every`` steps and at the
end. Messages during the run go through :meth:`Progress.write`, so they never glue onto the bar.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO


def _columns(stream: TextIO) -> Optional[int]:
    """The terminal's width; 0 for a terminal of unknown size (a bar there would be drawn 0 wide)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None


class Progress:
    def __init__(
        self,
        total: int,
        initial: int = 0,
        desc: str = "",
        enabled: bool = True,
        every: Optional[int] = None,
        stream: Optional[TextIO] = None,
    ):
        self.total, self.n, self.desc, self.enabled = total, initial, desc, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) and _columns(self.stream) != 0
        self.every = every or max(1, total // 20)
        self.start, self.start_n = time.perf_counter(), initial
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=self.stream)

    def update(self, loss: Optional[float] = None) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif self.n % self.every == 0 or self.n == self.total:
            self._line(loss)

    def _line(self, loss: Optional[float]) -> None:
        elapsed = time.perf_counter() - self.start
        done = self.n - self.start_n
        left = elapsed / done * (self.total - self.n) if done > 0 else 0.0
        loss_txt = f"  loss {loss:.4f}" if loss is not None else ""
        print(
            f"{self.desc} step {self.n}/{self.total}{loss_txt}  {elapsed:.0f} s, ~{left:.0f} s left",
            file=self.stream,
            flush=True,
        )

    def write(self, message: str) -> None:
        """Print ``message`` on a line of its own (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
