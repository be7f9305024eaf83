"""Export compressed models to files that reload without paratrain's training code.

One ``.safetensors`` file per model: the tensors plus, in the header metadata, a JSON spec
(architecture config, vocabulary, the shape and kind of every Linear, heads per attention
layer, tied weights). :func:`load_model` rebuilds the model from ``paratrain.models`` and the
spec, swaps in the smaller / quantized Linears the spec names, checks every tensor's shape and
loads it; nothing from ``paratrain.train`` is needed. Kinds: ``fp32`` (dense or pruned),
``int8`` (dynamic int8: int8 weight + per-channel scales), ``int8-weight`` / ``int4-weight``
(weight-only). Static int8 modules carry torch's packed parameters, so that mode is saved with
``torch.save`` (``.pt``, read back with ``weights_only=True``) and the same spec.

Tensors that are mostly zeros (unstructured pruning) are stored as their non-zero values plus a
one-bit-per-element mask whenever that is smaller, so bytes on disk reflect the sparsity.
:func:`export_torchscript` additionally writes a traced module that needs only ``torch``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

import paratrain.model_compression.quantization as Q
from paratrain.config import ConfigError, ModelConfig
from paratrain.grad_compression.codecs import pack_bits, unpack_bits
from paratrain.models import build_model
from paratrain.models.blocks import MultiHeadAttention

FORMAT = "paratrain-model/1"


class ExportError(ConfigError):
    """An exported model does not match what its spec (or the target model) expects."""


def _kind(mod: nn.Module) -> str | None:
    if isinstance(mod, Q.dynamic_linear_class()):
        return "int8"
    if isinstance(mod, Q.WeightOnlyLinear):
        return f"int{mod.bits}-weight"
    if type(mod) is nn.Linear:
        return "fp32"
    return None


def model_spec(model: nn.Module) -> dict[str, Any]:
    """What :func:`load_model` needs to rebuild ``model``'s structure."""
    lins: dict[str, list] = {}
    static = False
    for name, mod in model.named_modules():
        if isinstance(mod, Q.StaticInt8Linear):
            static = True
            w = mod.lin.weight() if callable(mod.lin.weight) else mod.lin.weight
            lins[name] = [w.shape[0], w.shape[1], True, "int8-static"]
            continue
        kind = _kind(mod)
        if kind is None or name.endswith(".lin") and name.removesuffix(".lin") in lins:
            continue
        if kind == "int8":
            w = mod.weight()
            lins[name] = [w.shape[0], w.shape[1], mod.bias() is not None, kind]
        elif kind == "fp32":
            lins[name] = [mod.out_features, mod.in_features, mod.bias is not None, kind]
        else:
            lins[name] = [mod.out_features, mod.in_features, mod.bias is not None, kind, mod.group]
    heads = {n: m.n_head for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)}
    fused = [n for n, m in model.named_modules() if isinstance(m, MultiHeadAttention) and m.qkv_proj is not None]
    return {"format": FORMAT, "arch": dataclasses.asdict(model.cfg), "vocab_size": model.vocab_size,
            "pad_id": model.pad_id, "linears": lins, "heads": heads, "fused_qkv": fused, "static_int8": static,
            "engine": getattr(model, "quant_engine", None)}


def model_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every persistent tensor under its name (dynamic int8 Linears as int8 weight + scales + bias),
    and ``{duplicate name: first name}`` for tensors shared between modules (tied weights)."""
    out: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[int, str] = {}
    dyn = Q.dynamic_linear_class()
    for name, mod in model.named_modules():
        pre = f"{name}." if name else ""
        if isinstance(mod, dyn):
            items = list(Q.dynamic_linear_tensors(mod).items())
        else:
            items = list(mod.named_parameters(recurse=False))
            items += [(k, b) for k, b in mod.named_buffers(recurse=False)
                      if b is not None and k not in mod._non_persistent_buffers_set]
        if isinstance(mod, nn.Embedding) and hasattr(mod, "int8_scale"):
            items = [("weight", torch.round(mod.weight.detach() / mod.int8_scale[:, None]).to(torch.int8)),
                     ("weight::rowscale", mod.int8_scale)]
            seen[id(mod.weight)] = pre + "weight"  # a head tied to this table refers to the int8 rows
        for k, t in items:
            if not isinstance(mod, dyn) and id(t) in seen:
                tied[pre + k] = seen[id(t)]
                continue
            seen[id(t)] = pre + k
            out[pre + k] = t
    return out, tied


# ---- sparse packing --------------------------------------------------------------------------

def _pack(t: Tensor) -> tuple[Tensor, Tensor] | None:
    """(mask bits, non-zero values) when that is smaller than the dense tensor, else None."""
    if t.dim() < 2:
        return None
    flat = t.detach().flatten()
    nz = flat != 0
    nnz = int(nz.sum())
    if nnz * t.element_size() + (flat.numel() + 7) // 8 > 0.9 * flat.numel() * t.element_size():
        return None
    return pack_bits(nz), flat[nz].contiguous()


def _unpack(bits: Tensor, values: Tensor, shape: list[int]) -> Tensor:
    n = 1
    for s in shape:
        n *= s
    nz = unpack_bits(bits, n)
    out = torch.zeros(n, dtype=values.dtype)
    out[nz] = values
    return out.view(shape)


# ---- save / load -----------------------------------------------------------------------------


def save_model(model: nn.Module, path: Path | str, pack_sparse: bool = True) -> Path:
    """Write ``model`` (a paratrain model, possibly pruned / quantized) to ``path`` (.safetensors;
    static int8 models to .pt instead). Returns the path written."""
    path = Path(path)
    spec = model_spec(model)
    if spec["static_int8"]:
        path = path.with_suffix(".pt")
        torch.save({"spec": json.dumps(spec), "state_dict": model.state_dict()}, path)
        return path
    tensors, tied = model_tensors(model)
    spec["tied"], spec["packed"] = tied, {}
    flat: dict[str, Tensor] = {}
    for name, t in tensors.items():
        packed = _pack(t) if pack_sparse else None
        if packed is None:
            flat[name] = t.detach().contiguous().clone()
        else:
            flat[name + "::nzmask"], flat[name + "::values"] = packed
            spec["packed"][name] = list(t.shape)
    save_file(flat, str(path), metadata={"paratrain": json.dumps(spec)})
    return path


def read_file(path: Path | str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(spec, tensors) of an exported model, sparse tensors unpacked."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"exported model {path} not found")
    if path.suffix == ".pt":
        with Q.quiet():
            obj = torch.load(path, map_location="cpu", weights_only=True)
        return json.loads(obj["spec"]), obj["state_dict"]
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ExportError(f"{path} is not a readable safetensors file: {e}") from None
    if "paratrain" not in meta:
        raise ExportError(f"{path} has no paratrain model spec in its metadata")
    spec = json.loads(meta["paratrain"])
    tensors = {k: v for k, v in raw.items() if "::" not in k or k.endswith("::rowscale")}
    for name, shape in spec.get("packed", {}).items():
        tensors[name] = _unpack(raw[name + "::nzmask"], raw[name + "::values"], shape)
    for key in [k for k in tensors if k.endswith("::rowscale")]:
        name = key.removesuffix("::rowscale")
        tensors[name] = tensors[name].float() * tensors.pop(key)[:, None]
    return spec, tensors


def _shape_error(path: Any, name: str, got: Any, want: Any) -> ExportError:
    return ExportError(f"{path}: tensor '{name}' has shape {list(got)} but the model expects {list(want)} "
                       "(the file was written for a differently shaped model)")


def skeleton(spec: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> nn.Module:
    """The model ``spec`` describes, with random weights (dynamic int8 Linears from ``tensors``)."""
    if spec.get("format") != FORMAT:
        raise ExportError(f"unknown export format {spec.get('format')!r} (expected {FORMAT})")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in spec["arch"].items() if k in fields})
    model = build_model(cfg, spec["vocab_size"], spec["pad_id"]).eval()
    for name, n_head in spec["heads"].items():
        model.get_submodule(name).n_head = n_head
    for name in spec.get("fused_qkv", []):
        model.get_submodule(name).fuse_qkv()
    static = []
    for name, (out_f, in_f, bias, kind, *rest) in spec["linears"].items():
        cur = model.get_submodule(name)
        if kind == "fp32":
            if (cur.out_features, cur.in_features, cur.bias is not None) != (out_f, in_f, bias):
                Q.set_module(model, name, nn.Linear(in_f, out_f, bias=bias))
        elif kind == "int8":
            t = {k: tensors[f"{name}.{k}"] for k in ("weight_int8", "weight_scale", "bias")
                 if tensors is not None and f"{name}.{k}" in tensors}
            if "weight_int8" not in t:
                raise ExportError(f"int8 Linear '{name}' has no weight_int8 tensor")
            if tuple(t["weight_int8"].shape) != (out_f, in_f):
                raise _shape_error("model", f"{name}.weight_int8", t["weight_int8"].shape, (out_f, in_f))
            Q.set_module(model, name, Q.make_dynamic_linear(in_f, out_f, t))
        elif kind in ("int8-weight", "int4-weight"):
            Q.set_module(model, name, Q.WeightOnlyLinear(in_f, out_f, int(kind[3]), rest[0], bias))
        elif kind == "int8-static":
            Q.set_module(model, name, nn.Linear(in_f, out_f, bias=bias))
            static.append(name)
        else:
            raise ExportError(f"unknown Linear kind {kind!r} for '{name}'")
    if static:
        Q.static_skeleton(model)
        Q.static_convert(model)
    return model


@torch.no_grad()
def load_tensors(model: nn.Module, tensors: dict[str, Tensor], tied: dict[str, str] | None = None,
                 source: Any = "checkpoint") -> None:
    """Copy ``tensors`` into ``model`` by name after checking that names and shapes match exactly."""
    want, _ = model_tensors(model)
    dyn = {n for n, m in model.named_modules() if isinstance(m, Q.dynamic_linear_class())}
    want = {k: v for k, v in want.items() if k.rpartition(".")[0] not in dyn}
    have = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in dyn}
    for dup in (tied or {}):
        have.pop(dup, None)
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise ExportError(f"{source}: tensors do not match the model (missing {missing[:4]}, unexpected {extra[:4]})")
    for k, dst in want.items():
        if dst.shape != have[k].shape:
            raise _shape_error(source, k, have[k].shape, dst.shape)
        dst.copy_(have[k])


def load_model(path: Path | str) -> nn.Module:
    """Rebuild an exported model (eval mode) from its file; raises ExportError on any mismatch."""
    spec, tensors = read_file(path)
    with Q.engine(spec.get("engine")):  # int8 weights are packed for the engine they were made with
        model = skeleton(spec, tensors)
    if spec.get("engine"):
        model.quant_engine = spec["engine"]
    if spec.get("static_int8"):
        sd = model.state_dict()
        for k, v in tensors.items():
            if isinstance(v, Tensor) and k in sd and isinstance(sd[k], Tensor) and sd[k].shape != v.shape:
                raise _shape_error(path, k, v.shape, sd[k].shape)
        try:
            model.load_state_dict(tensors)
        except RuntimeError as e:
            raise ExportError(f"{path}: {str(e).splitlines()[0]}") from None
        return model.eval()
    load_tensors(model, tensors, spec.get("tied"), path)
    return model.eval()


def export_torchscript(model: nn.Module, example: dict[str, Tensor], path: Path | str) -> Path:
    """Trace ``model`` on ``example`` inputs (labels dropped) into a file ``torch.jit.load`` runs alone."""
    inputs = tuple(v for k, v in example.items() if k != "labels")
    with Q.quiet(), torch.no_grad():
        traced = torch.jit.trace(model.eval(), inputs, check_trace=False)
    torch.jit.save(traced, str(path))
    return Path(path)
