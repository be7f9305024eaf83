"""Quantization of a trained model's Linear layers: dynamic int8, static int8, QAT, weight-only int8/int4.

- ``quantize_dynamic_int8``: int8 weights (per output channel, symmetric) and activations
  quantized on the fly per batch, via ``torch.ao.quantization.quantize_dynamic`` (fbgemm /
  x86 kernels). The fast path on CPU; paratrain's attention is built from ``nn.Linear``, so the
  ``nn.MultiheadAttention`` fast path (which ``quantize_dynamic`` breaks in eval mode) is never taken.
- ``quantize_static_int8``: activation ranges calibrated on held-out batches (histogram
  observer); every Linear runs int8 -> int8 between a quantize and a dequantize.
- ``prepare_qat`` / ``convert_qat``: fine-tune with fake-quantized weights and activations
  (straight-through gradients) that mimic the dynamic int8 kernels, then convert.
- ``quantize_weight_only``: int8 (per channel) or group-wise int4 weights with fp32 compute;
  pays on disk and in memory, not in CPU speed.
Embedding lookups stay fp32 in every mode, and a head tied to the embedding stays fp32 and shared
(``quantize_embeddings_int8`` can still store the table as int8 rows).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from paratrain.config import ConfigError
from paratrain.models.blocks import MultiHeadAttention

MODES = ("int8", "int8-static", "int8-qat", "int8-weight", "int4-weight")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.ao eager quantization prints a deprecation warning on every call in torch 2.13."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def engine(name: str | None) -> Iterator[None]:
    """Use quantized engine ``name`` (x86 | fbgemm | onednn | qnnpack) inside the block; None: unchanged.
    Packed int8 weights belong to the engine that packed them and run under any engine setting."""
    old = torch.backends.quantized.engine
    if name and name != old:
        if name not in torch.backends.quantized.supported_engines:
            raise ConfigError(f"quantized engine {name!r} is not one of {torch.backends.quantized.supported_engines}")
        torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def linears(model: nn.Module, cls: type = nn.Linear) -> list[tuple[str, nn.Module]]:
    """(name, module) of the modules of exactly type ``cls`` whose weight is not an embedding's
    (a tied LM head stays fp32 and shared: quantizing it would store the table twice)."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [(n, m) for n, m in model.named_modules() if type(m) is cls and id(m.weight) not in emb]


@torch.no_grad()
def quantize_embeddings_int8(model: nn.Module) -> nn.Module:
    """Round every embedding table (in place) to int8 per row (symmetric, scale = amax / 127) and
    keep the scales as ``int8_scale`` so the exporter stores one byte per weight. Lookups stay
    fp32, with exactly the values the int8 file holds; a tied head uses them too."""
    for m in model.modules():
        if isinstance(m, nn.Embedding) and not hasattr(m, "int8_scale"):
            scale = (m.weight.abs().amax(dim=1) / 127).clamp_min(1e-12)
            m.weight.copy_(torch.round(m.weight / scale[:, None]).clamp(-127, 127) * scale[:, None])
            m.int8_scale = scale
    return model


# ---- dynamic int8 ------------------------------------------------------------------------------


def dynamic_qconfig():
    """Per-output-channel symmetric int8 weights, dynamic per-tensor uint8 activations."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    return per_channel_dynamic_qconfig


def fuse_qkv(model: nn.Module) -> nn.Module:
    """Fuse the q/k/v projections of every self-attention module in place (see ``fuse_qkv`` of
    :class:`MultiHeadAttention`); other modules, cross-attention included, are left alone."""
    for m in model.modules():
        if isinstance(m, MultiHeadAttention) and not m.cross:
            m.fuse_qkv()
    return model


def quantize_dynamic_int8(model: nn.Module, inplace: bool = False, engine_name: str | None = None,
                          fuse: bool = True) -> nn.Module:
    """A copy of ``model`` (eval mode) with every Linear (but a head tied to the embedding, which
    stays shared) replaced by a dynamic int8 Linear packed for ``engine_name`` (default: torch's).

    ``fuse``: first fuse each self-attention's q/k/v into one Linear. The three share their input,
    so the fused int8 layer gives the same numbers (one activation scale, per-row weight scales)
    while quantizing the input once and running one wider matmul (at d 128 with oneDNN: 0.9 ms
    against 3 x 0.62 ms for the three).
    """
    from torch.ao.quantization import quantize_dynamic

    q = model if inplace else copy.deepcopy(model)
    q.eval()
    if fuse:
        fuse_qkv(q)
    spec = {name: dynamic_qconfig() for name, _ in linears(q)}
    with quiet(), engine(engine_name):
        quantize_dynamic(q, spec, inplace=True)
        q.quant_engine = torch.backends.quantized.engine
    return q


def dynamic_linear_class() -> type:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return DynamicLinear


def dynamic_linear_tensors(mod: nn.Module) -> dict[str, Tensor]:
    """The int8 weight, its per-channel scales and the fp32 bias of a dynamic int8 Linear."""
    w = mod.weight()
    out = {"weight_int8": w.int_repr().contiguous(), "weight_scale": w.q_per_channel_scales().float()}
    b = mod.bias()
    if b is not None:
        out["bias"] = b.detach().float()
    return out


def make_dynamic_linear(in_f: int, out_f: int, t: dict[str, Tensor]) -> nn.Module:
    """A dynamic int8 Linear holding exactly the given int8 weight and scales (no re-quantization)."""
    scale = t["weight_scale"].double()
    zp = torch.zeros(out_f, dtype=torch.long)
    qw = torch._make_per_channel_quantized_tensor(t["weight_int8"].to(torch.int8), scale, zp, 0)
    mod = dynamic_linear_class()(in_f, out_f, bias_=("bias" in t), dtype=torch.qint8)
    mod.set_weight_bias(qw, t.get("bias"))
    return mod


# ---- static int8 -------------------------------------------------------------------------------


class StaticInt8Linear(nn.Module):
    """quantize -> int8 Linear -> dequantize; the stubs become real ops after ``convert``."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.lin, self.dequant = QuantStub(), lin, DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self.lin(self.quant(x)))


def static_skeleton(model: nn.Module) -> nn.Module:
    """Wrap every Linear of ``model`` (in place) and insert calibration observers."""
    from torch.ao.quantization import get_default_qconfig, prepare

    qc = get_default_qconfig(torch.backends.quantized.engine)
    for name, lin in linears(model):
        w = StaticInt8Linear(lin)
        w.qconfig = qc
        set_module(model, name, w)
    with quiet():
        prepare(model, inplace=True)
    return model


def static_convert(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import convert

    with quiet():
        convert(model, inplace=True)
    return model


@torch.no_grad()
def quantize_static_int8(model: nn.Module, calib_batches: Iterable[dict[str, Tensor]]) -> nn.Module:
    """A copy of ``model`` with static int8 Linears, activation ranges calibrated on ``calib_batches``."""
    q = copy.deepcopy(model).eval()
    static_skeleton(q)
    n = 0
    for b in calib_batches:
        q(**{k: v for k, v in b.items() if k != "labels"})
        n += 1
    if n == 0:
        raise ConfigError("static int8 quantization needs at least one calibration batch")
    return static_convert(q)


# ---- quantization-aware training ---------------------------------------------------------------


def fake_quant_weight(w: Tensor) -> Tensor:
    """Per-output-channel symmetric int8, as the dynamic int8 kernels store it (scale = amax / 127.5)."""
    scale = (w.detach().abs().amax(dim=1) / 127.5).clamp_min(1e-12).float()
    zp = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -128, 127)


def fake_quant_activation(x: Tensor) -> Tensor:
    """Per-tensor asymmetric 7-bit (reduce_range) uint8 over [min(x, 0), max(x, 0)], like fbgemm's
    dynamic activation quantization."""
    lo = x.detach().min().clamp(max=0.0)
    hi = x.detach().max().clamp(min=0.0)
    scale = float(((hi - lo) / 127.0).clamp_min(1e-8))
    zp = int(torch.round(-lo / scale).clamp(0, 127))
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 127)


class FakeQuantLinear(nn.Module):
    """A Linear that trains through fake-quantized weights and inputs (straight-through gradients);
    it shares its weight and bias Parameters with the Linear it replaced."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight, self.bias = lin.weight, lin.bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(fake_quant_activation(x), fake_quant_weight(self.weight), self.bias)


def prepare_qat(model: nn.Module) -> nn.Module:
    """Swap every Linear of ``model`` (in place) for a :class:`FakeQuantLinear` to fine-tune it."""
    for name, lin in linears(model):
        set_module(model, name, FakeQuantLinear(lin))
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """Back to plain Linears (in place), then dynamic int8: the same grid the fake quant used."""
    for name, fq in linears(model, FakeQuantLinear):
        lin = nn.Linear(fq.in_features, fq.out_features, bias=fq.bias is not None)
        lin.weight = fq.weight
        lin.bias = fq.bias
        set_module(model, name, lin)
    return quantize_dynamic_int8(model, inplace=True)


# ---- weight-only -------------------------------------------------------------------------------


class WeightOnlyLinear(nn.Module):
    """Linear with int8 (per channel) or int4 (per group of ``group`` inputs, two to a byte) weights,
    dequantized on each call and multiplied in fp32: it saves bytes (on disk and in memory), not time.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 8, group: int = 32,
                 bias: bool = True) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ConfigError(f"weight-only quantization supports 8 or 4 bits, not {bits}")
        if bits == 4 and in_features % group:
            group = next(g for g in (group, 16, 8, 4, 2, 1) if in_features % g == 0)
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(out_features))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(out_features, in_features // group))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, bits: int = 8, group: int = 32) -> WeightOnlyLinear:
        m = cls(lin.in_features, lin.out_features, bits, group, lin.bias is not None)
        w = lin.weight.detach().float()
        if bits == 8:
            scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
            m.qweight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        else:
            g = w.reshape(w.shape[0], -1, m.group)
            scale = (g.abs().amax(dim=2) / 7).clamp_min(1e-12)
            q = torch.round(g / scale[..., None]).clamp(-8, 7).to(torch.int16).reshape(w.shape) + 8
            m.qweight.copy_((q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8))
        m.scale.copy_(scale)
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach())
        return m

    def dequantized(self) -> Tensor:
        """The fp32 weight (out, in) these int values stand for."""
        if self.bits == 8:
            return self.qweight.float() * self.scale[:, None]
        q = torch.stack([self.qweight & 0xF, self.qweight >> 4], dim=2).reshape(self.out_features, -1)
        q = q[:, : self.in_features].float() - 8
        return (q.reshape(self.out_features, -1, self.group) * self.scale[..., None]).reshape(q.shape)

    def forward(self, x: Tensor) -> Tensor:
        # torch's int8 weight-only kernel (_weight_int8pack_mm) is made for a few rows of decode;
        # on whole sequences it was 20-40x slower than fp32 here, so dequantize and run fp32
        return F.linear(x, self.dequantized(), self.bias)


def quantize_weight_only(model: nn.Module, bits: int = 8, group: int = 32) -> nn.Module:
    """A copy of ``model`` whose Linears keep ``bits``-bit weights and compute in fp32."""
    q = copy.deepcopy(model).eval()
    for name, lin in linears(q):
        set_module(q, name, WeightOnlyLinear.from_linear(lin, bits, group))
    return q
