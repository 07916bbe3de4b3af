"""Progress for drawing: which image, which sampling step, how long until done.

On a terminal one line is redrawn in place; in a log (the GUI's job log, CI, a pipe) a line is
written every few seconds instead, so slow work never looks hung and logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class DrawProgress:
    """Counts sampling steps over `images` images of `steps` steps each; `step(image, done)` after
    each step of image `image` (0-based), `image_done()` after each image."""

    def __init__(
        self,
        images: int,
        steps: int,
        label: str = "image",
        stream: TextIO | None = None,
        every_s: float = 5.0,
        clock=time.monotonic,
    ):
        self.images, self.steps, self.label = images, steps, label
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every_s, self.clock = every_s, clock
        self.start = clock()
        self.last_line = -float("inf")
        self.finished = 0  # images done
        self.done_steps = 0  # steps done over all images

    def eta_s(self) -> float | None:
        if self.done_steps == 0:
            return None
        per_step = (self.clock() - self.start) / self.done_steps
        return per_step * (self.images * self.steps - self.done_steps)

    def line(self, image: int, step: int) -> str:
        eta = self.eta_s()
        tail = f", ETA {format_duration(eta)}" if eta is not None else ""
        return f"{self.label} {image + 1}/{self.images}, step {step}/{self.steps}{tail}"

    def step(self, image: int, step: int, steps: int | None = None) -> None:
        self.steps = steps or self.steps  # a sampler may run a step more or less than asked (DDIM, DPM2)
        self.done_steps = image * self.steps + step
        now = self.clock()
        if self.tty:
            self.stream.write("\r" + self.line(image, step).ljust(60))
            self.stream.flush()
        elif now - self.last_line >= self.every_s:
            self.stream.write(self.line(image, step) + "\n")
            self.stream.flush()
            self.last_line = now

    def close(self) -> None:
        took = format_duration(self.clock() - self.start)
        end = f"{self.images} {self.label}(s) in {took}"
        self.stream.write(("\r" + end.ljust(60) + "\n") if self.tty else end + "\n")
        self.stream.flush()
