"""Rank 0's progress report: a bar on a terminal, plain lines at an interval in a batch log."""
from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """step, server loss, images/s and ETA. On a terminal one redrawn bar; otherwise (a job's log
    file) one line every `every_s` seconds and after the last step. Off with --quiet."""

    def __init__(self, total: int, enabled: bool, images_per_step: int, every_s: float = 30.0,
                 stream=None, clock=time.perf_counter):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.enabled, self.images_per_step = total, enabled, images_per_step
        self.tty = enabled and self.stream.isatty()
        self.every_s, self.clock = every_s, clock
        self.t0 = self.first = None  # rates count from the end of the first step seen (start-up
        self.last = None             # and a resumed run's earlier steps are left out)

    def line(self, step: int, loss: float, now: float) -> str:
        done, elapsed = step - self.first, now - self.t0
        if done <= 0 or elapsed <= 0:
            speed = "images/s -  ETA -"
        else:
            speed = (f"{done * self.images_per_step / elapsed:.0f} images/s  "
                     f"ETA {_clock((self.total - step - 1) * elapsed / done)}")
        return f"step {step + 1}/{self.total}  server loss {loss:.4f}  {speed}"

    def update(self, step: int, loss: float):
        if not self.enabled:
            return
        now = self.clock()
        if self.t0 is None:
            self.t0, self.first, self.last = now, step, now - self.every_s  # the first step is shown
        if self.tty:
            bar = int(30 * (step + 1) / self.total)
            self.stream.write(f"\r[{'#' * bar}{'.' * (30 - bar)}] {self.line(step, loss, now)} ")
            self.stream.flush()
        elif now - self.last >= self.every_s or step + 1 == self.total:
            self.last = now
            print(f"progress: {self.line(step, loss, now)}", file=self.stream, flush=True)

    def close(self):
        if self.tty:
            self.stream.write("\n")
