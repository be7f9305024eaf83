"""Loss-rise safeguard: fall back to uncompressed gradients when compression hurts training.

While compressing, each step's loss is compared with the mean of the last ``window``
losses; a loss above ``factor`` times that mean (or a non-finite loss) switches
compression off for the next ``steps`` steps.  ``steps = 0`` disables the safeguard.
Every rank of an all-reduce group must see the same losses (the DDP strategy feeds it
the globally reduced loss) so all ranks switch together.
"""

from __future__ import annotations

import math
from collections import deque


class LossSafeguard:
    """Tracks the running mean of the loss and decides when to send uncompressed gradients."""

    def __init__(self, factor: float = 2.0, window: int = 20, steps: int = 20):
        self.factor, self.window, self.steps = factor, window, steps
        self.history: deque[float] = deque(maxlen=window)
        self.fallback_left = 0  # steps still to send uncompressed
        self.triggers = 0  # how many times it fell back
        self.uncompressed_steps = 0
        self.last_event = ""

    @property
    def compressing(self) -> bool:
        """True when the next step may send compressed gradients."""
        return self.fallback_left == 0

    def observe(self, loss: float) -> bool:
        """Record one step's loss (after its gradients were sent); True when it just fell back."""
        was_compressing = self.compressing
        if not was_compressing:
            self.fallback_left -= 1
            self.uncompressed_steps += 1
        if self.steps <= 0:
            return False
        full = len(self.history) == self.window
        mean = sum(self.history) / len(self.history) if self.history else 0.0
        rose = not math.isfinite(loss) or (full and loss > self.factor * mean)
        if was_compressing and rose:
            self.fallback_left = self.steps
            self.triggers += 1
            self.last_event = (
                f"loss {loss:.4g} > {self.factor:g} x running mean {mean:.4g} over {len(self.history)} steps "
                f"while compressing: sending uncompressed gradients for {self.steps} steps"
            )
            return True
        if math.isfinite(loss):
            self.history.append(loss)
        return False
