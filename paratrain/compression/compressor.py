"""What a sender keeps: one codec, one :class:`CodecState` per tensor, and the loss safeguard.

Used by the parameter-server worker on push (the server only calls ``decode``) and by the
DDP hooks for the per-bucket states::

    comp = GradientCompressor.from_config(cfg.compression, seed=rank)
    payload = comp.encode("layer.0.weight", grad)   # codec "none" while the safeguard falls back
    ...  send payload.meta() + payload.tensors; count payload.nbytes
    comp.observe_loss(loss)                         # once per step, after the push
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch

from paratrain.compression.codecs import Codec, CodecState, Payload, make_codec
from paratrain.compression.safeguard import LossSafeguard


class GradientCompressor:
    """Codec + per-tensor states + safeguard for one sender."""

    def __init__(self, codec: Codec, error_feedback: bool = True, safeguard: LossSafeguard | None = None,
                 seed: int = 0):
        self.codec = codec
        self.plain = Codec()
        self.error_feedback = error_feedback and codec.name != "none"
        self.safeguard = safeguard if codec.name != "none" else None
        self.seed = seed
        self.states: dict[Hashable, CodecState] = {}

    @classmethod
    def from_config(cls, comp: Any, seed: int = 0) -> GradientCompressor:
        """From a ``[compression]`` section; ``seed`` should differ per worker (stochastic rounding)."""
        guard = LossSafeguard(comp.fallback_factor, comp.fallback_window, comp.fallback_steps)
        return cls(make_codec(comp), comp.error_feedback, guard, seed)

    @property
    def name(self) -> str:
        return self.codec.name

    @property
    def active(self) -> bool:
        """True when this step sends compressed payloads (a codec is set and no fallback runs)."""
        return self.codec.name != "none" and (self.safeguard is None or self.safeguard.compressing)

    def state(self, key: Hashable) -> CodecState:
        """The state of one tensor (created on first use)."""
        st = self.states.get(key)
        if st is None:
            st = self.codec.new_state(self.error_feedback, seed=self.seed * 100003 + len(self.states))
            self.states[key] = st
        return st

    def encode(self, key: Hashable, tensor: torch.Tensor, segments: list[int] | None = None) -> Payload:
        """Compress one named tensor (sent raw while the safeguard falls back).

        ``segments``: see :meth:`Codec.encode` (per-tensor top-k inside a flat bucket).
        """
        codec = self.codec if self.active else self.plain
        return codec.encode(tensor, self.state(key), segments)

    def observe_loss(self, loss: float) -> bool:
        """Feed one step's loss to the safeguard; True when it just switched to uncompressed.

        Switching also drops the error-feedback residuals: they hold many steps of stale
        gradient, and sending them in one piece (with Adam: inflating every second moment)
        is the opposite of what a rising loss needs.
        """
        if self.safeguard is None or not self.safeguard.observe(loss):
            return False
        for st in self.states.values():
            st.residual = None
        return True

    def summary(self) -> dict[str, Any]:
        """Fields for summary.json."""
        g = self.safeguard
        return {"compression": self.codec.name, "error_feedback": self.error_feedback,
                "compression_fallbacks": g.triggers if g else 0,
                "uncompressed_steps": g.uncompressed_steps if g else 0}
