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

from paratrain.grad_compression.codecs import Codec, CodecState, Payload, TopKCodec, make_codec, warmup_ratio
from paratrain.grad_compression.safeguard import LossSafeguard


class GradientCompressor:
    """Codec + per-tensor states + safeguard + warm-up schedule for one sender.

    Warm-up (``warmup_steps`` > 0): the first steps are compressed less.  Top-k ramps its
    kept fraction down exponentially, as Deep Gradient Compression does (Lin et al. 2018):
    equal stages of 25%, 6.25%, 1.5625%, ... of the entries, then ``topk_ratio``; the other
    codecs send uncompressed gradients for those steps (as torch's PowerSGD hook does before
    ``start_powerSGD_iter``).  Steps are counted by :meth:`observe_loss`, called once per
    step by both paths (so the warm-up restarts with a resumed process, like the residuals).
    """

    def __init__(self, codec: Codec, error_feedback: bool = True, safeguard: LossSafeguard | None = None,
                 seed: int = 0, warmup_steps: int = 0, warmup_start: float = 0.25):
        self.codec = codec
        self.plain = Codec()
        self.error_feedback = error_feedback and codec.name != "none"
        self.safeguard = safeguard if codec.name != "none" else None
        self.seed = seed
        self.states: dict[Hashable, CodecState] = {}
        self.warmup_steps = warmup_steps if codec.name != "none" else 0
        self.warmup_start = warmup_start
        self.warmup_factor = 4.0
        self.step = 0  # steps observed so far (observe_loss)
        self._ramp: dict[float, TopKCodec] = {}

    @classmethod
    def from_config(cls, comp: Any, seed: int = 0) -> GradientCompressor:
        """From a ``[compression]`` section; ``seed`` should differ per worker (stochastic rounding)."""
        guard = LossSafeguard(comp.fallback_factor, comp.fallback_window, comp.fallback_steps)
        return cls(make_codec(comp), comp.error_feedback, guard, seed, getattr(comp, "warmup_steps", 0))

    @property
    def name(self) -> str:
        return self.codec.name

    @property
    def warming_up(self) -> bool:
        """True during the first ``warmup_steps`` steps."""
        return self.step < self.warmup_steps

    @property
    def active(self) -> bool:
        """True when this step sends compressed payloads (a codec is set, no fallback runs, and
        no uncompressed warm-up step: top-k's warm-up sends less sparse payloads, which counts as active)."""
        if self.codec.name == "none" or (self.safeguard is not None and not self.safeguard.compressing):
            return False
        return not self.warming_up or isinstance(self.codec, TopKCodec)

    @property
    def current(self) -> Codec:
        """The codec this step encodes with (top-k with the warm-up's ratio while warming up)."""
        if not self.active:
            return self.plain
        if isinstance(self.codec, TopKCodec) and self.warming_up:
            r = warmup_ratio(self.step, self.warmup_steps, self.codec.ratio, self.warmup_start,
                             self.warmup_factor)
            if r != self.codec.ratio:
                if r not in self._ramp:
                    self._ramp[r] = TopKCodec(r)
                return self._ramp[r]
        return self.codec

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
        return self.current.encode(tensor, self.state(key), segments)

    def tick(self) -> None:
        """One step done (advances the warm-up); :meth:`observe_loss` calls it."""
        self.step += 1

    def observe_loss(self, loss: float) -> bool:
        """Feed one step's loss to the safeguard; True when it just switched to uncompressed.

        Switching also drops the error-feedback residuals: they hold many steps of stale
        gradient, and sending them in one piece (with Adam: inflating every second moment)
        is the opposite of what a rising loss needs.
        """
        self.tick()
        if self.safeguard is None or not self.safeguard.observe(loss):
            return False
        for st in self.states.values():
            st.residual = None
        return True

    def summary(self) -> dict[str, Any]:
        """Fields for summary.json."""
        g = self.safeguard
        return {"compression": self.codec.name, "error_feedback": self.error_feedback,
                "compression_warmup_steps": self.warmup_steps,
                "compression_fallbacks": g.triggers if g else 0,
                "uncompressed_steps": g.uncompressed_steps if g else 0}
