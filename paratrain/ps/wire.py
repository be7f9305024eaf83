"""Gradients on the wire: per-key encoding with the compression layer's codecs, sparse rows.

Workers encode each key's gradient with :class:`PushEncoder` (the codecs of
``paratrain.grad_compression`` -- fp16, bf16, int8, top-k, PowerSGD with error feedback -- or,
when that package is absent, a built-in fp32/fp16 cast).  Embedding keys whose gradient
touches less than half of the rows are sent as (row indices, rows) instead.  Servers call
:func:`decode_key`, which needs no codec object or state.
"""

from __future__ import annotations

from typing import Any

import torch

from paratrain.ps.placement import KeySpec
from paratrain.ps.protocol import KEY_SPARSE, KeyRecord, ProtocolError

try:  # the gradient-compression layer (its codecs plug in here)
    from paratrain.grad_compression import GradientCompressor, Payload
    from paratrain.grad_compression import decode as codec_decode
except ImportError:  # pragma: no cover - only without the compression package
    GradientCompressor = None  # type: ignore[assignment,misc]

CODEC_IDS = {"none": 0, "fp16": 1, "bf16": 2, "int8": 3, "topk": 4, "powersgd": 5}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
INFO_FIELDS = {"int8": ("chunk",), "powersgd": ("raw",)}  # codec parameters carried in info0/info1
CAST = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SPARSE_MAX_FRACTION = 0.5
INT8_CHUNK_MAX = 1 << 20  # a larger int8 chunk than this (or than the key) is refused: decode pads to it


class PushEncoder:
    """One worker's gradient encoder: codec + error-feedback state per key + loss safeguard."""

    def __init__(self, comp: Any, seed: int = 0):
        self.codec = comp.gradient
        self.compressor = None
        if self.codec != "none":
            if GradientCompressor is not None:
                self.compressor = GradientCompressor.from_config(comp, seed=seed)
            elif self.codec != "fp16":
                raise ValueError(f"compression.gradient = {self.codec!r} needs paratrain.grad_compression")

    @property
    def active(self) -> str:
        """The codec this step's pushes use ("none" while the loss safeguard falls back)."""
        if self.compressor is None:
            return self.codec
        return self.codec if self.compressor.active else "none"

    def encode(self, key: KeySpec, grad: torch.Tensor) -> tuple[KeyRecord, list[torch.Tensor]]:
        """Key record + wire tensors of one key's gradient (``grad`` has the key's shape)."""
        codec = self.active
        if key.sparse and codec in CAST and len(key.shape) == 2 and key.shape[0] > 1:
            touched = grad.ne(0).any(dim=1).nonzero().squeeze(1)
            if touched.numel() < SPARSE_MAX_FRACTION * key.shape[0]:
                rows = grad.index_select(0, touched).to(CAST[codec])
                return KeyRecord(key.id, CODEC_IDS[codec], 2, KEY_SPARSE), [touched, rows]
        if codec == "none":
            return KeyRecord(key.id, 0, 1), [grad.float() if grad.dtype != torch.float32 else grad]
        if self.compressor is None:  # built-in fp16 fallback
            return KeyRecord(key.id, CODEC_IDS["fp16"], 1), [grad.to(torch.float16)]
        payload = self.compressor.encode(key.id, grad)
        info = [int(payload.info.get(f, 0)) for f in INFO_FIELDS.get(payload.codec, ())] + [0, 0]
        ts = [t if t.dim() in (1, 2) else t.reshape(-1) for t in payload.tensors]
        return KeyRecord(key.id, CODEC_IDS[payload.codec], len(ts), 0, info[0], info[1]), ts

    def observe_loss(self, loss: float) -> None:
        if self.compressor is not None:
            self.compressor.observe_loss(loss)

    def summary(self) -> dict[str, Any]:
        if self.compressor is not None:
            return self.compressor.summary()
        return {"compression": self.codec}


def decode_key(rec: KeyRecord, tensors: list[torch.Tensor], key: KeySpec):
    """Server side: ``("dense", grad)`` with ``key.numel`` elements or ``("rows", idx, rows)``."""
    name = CODEC_NAMES.get(rec.codec)
    if name is None:
        raise ProtocolError("malformed", f"key {key.id}: unknown codec id {rec.codec}")
    if rec.flags & KEY_SPARSE:
        if name not in CAST or len(tensors) != 2 or len(key.shape) != 2:
            raise ProtocolError("malformed", f"key {key.id}: bad sparse-rows payload")
        idx, rows = tensors
        if idx.dtype != torch.int64 or rows.dim() != 2 or rows.shape != (idx.numel(), key.shape[1]) \
                or idx.numel() > key.shape[0]:
            raise ProtocolError("malformed", f"key {key.id}: sparse rows of shape {tuple(rows.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= key.shape[0]):
            raise ProtocolError("malformed", f"key {key.id}: row index out of range")
        return "rows", idx, rows.float()
    if name in CAST:
        if len(tensors) != 1 or tensors[0].dtype != CAST[name] or tensors[0].numel() != key.numel:
            raise ProtocolError("malformed", f"key {key.id}: {name} payload does not match the key")
        return "dense", tensors[0].reshape(-1).float()
    if GradientCompressor is None:
        raise ProtocolError("malformed", f"codec {name} needs paratrain.grad_compression on the server")
    info = dict(zip(INFO_FIELDS.get(name, ()), (rec.info0, rec.info1), strict=False))
    if name == "int8" and not 1 <= info["chunk"] <= max(key.numel, INT8_CHUNK_MAX):  # decode pads to whole chunks
        raise ProtocolError("malformed", f"key {key.id}: int8 chunk {info['chunk']} for {key.numel} elements")
    if name == "powersgd" and info["raw"] not in (0, 1):
        raise ProtocolError("malformed", f"key {key.id}: powersgd raw flag {info['raw']}")
    try:
        out = codec_decode(Payload(name, key.shape, torch.float32, tensors, info))
    except (RuntimeError, ValueError, IndexError, KeyError) as e:
        raise ProtocolError("malformed", f"key {key.id}: {name} payload does not decode: {e}") from None
    if out.numel() != key.numel:
        raise ProtocolError("malformed", f"key {key.id}: {name} payload decodes to {out.numel()} elements")
    return "dense", out.reshape(-1).float()
