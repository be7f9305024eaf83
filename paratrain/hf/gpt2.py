"""GPT-2 family <-> paratrain ``gpt``.

HF GPT-2 stores its linears as ``Conv1D`` with weights (in, out), the transpose of ``nn.Linear``,
and fuses q/k/v into one ``c_attn`` whose output columns are [q | k | v]; paratrain's GPT has
separate ``q_proj``/``k_proj``/``v_proj`` Linears (or a fused ``qkv_proj`` after ``fuse_qkv``,
rows [q; k; v]).  GPT-2's default activation ``gelu_new`` is the tanh approximation of GELU, and
paratrain's GPT uses exact GELU: such checkpoints load and train, with logits off by about 1e-3
(``activation_function = "gelu"`` checkpoints match exactly).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from paratrain.errors import ConfigError
from paratrain.hf.common import Adapter, Named, rename

PLAIN = [  # (HF name, paratrain name): copied as they are
    ("wte.weight", "tok_emb.weight"),
    ("wpe.weight", "pos_emb.weight"),
    ("h.{i}.ln_1.weight", "layers.{i}.ln1.weight"),
    ("h.{i}.ln_1.bias", "layers.{i}.ln1.bias"),
    ("h.{i}.ln_2.weight", "layers.{i}.ln2.weight"),
    ("h.{i}.ln_2.bias", "layers.{i}.ln2.bias"),
    ("h.{i}.attn.c_proj.bias", "layers.{i}.attn.out_proj.bias"),
    ("h.{i}.mlp.c_fc.bias", "layers.{i}.ffn.fc1.bias"),
    ("h.{i}.mlp.c_proj.bias", "layers.{i}.ffn.fc2.bias"),
    ("ln_f.weight", "norm.weight"),
    ("ln_f.bias", "norm.bias"),
    ("lm_head.weight", "lm_head.weight"),
]
CONV1D = [  # transposed on the way
    ("h.{i}.attn.c_proj.weight", "layers.{i}.attn.out_proj.weight"),
    ("h.{i}.mlp.c_fc.weight", "layers.{i}.ffn.fc1.weight"),
    ("h.{i}.mlp.c_proj.weight", "layers.{i}.ffn.fc2.weight"),
]
QKV = ("h.{i}.attn.c_attn.weight", "h.{i}.attn.c_attn.bias")
_EXACT_GELU = "gelu"
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def model_keys(hf: dict[str, Any]) -> dict[str, Any]:
    """paratrain ``[model]`` keys of a GPT-2 ``config.json``."""
    act = hf.get("activation_function", "gelu_new")
    if act != _EXACT_GELU and act not in _TANH_GELU:
        raise ConfigError(f"GPT-2 activation_function = {act!r} is not GELU; paratrain's gpt cannot run it")
    if hf.get("add_cross_attention") or hf.get("scale_attn_by_inverse_layer_idx"):
        raise ConfigError("GPT-2 with add_cross_attention or scale_attn_by_inverse_layer_idx is not "
                          "paratrain's gpt; it cannot be imported")
    eps = float(hf.get("layer_norm_epsilon", 1e-5))
    if abs(eps - 1e-5) > 1e-12:
        raise ConfigError(f"GPT-2 layer_norm_epsilon = {eps} differs from paratrain's LayerNorm eps 1e-5")
    d = int(hf["n_embd"])
    return {"arch": "gpt", "n_layer": int(hf["n_layer"]), "n_head": int(hf["n_head"]), "d_model": d,
            "d_ff": int(hf.get("n_inner") or 4 * d), "max_seq_len": int(hf.get("n_positions", 1024)),
            "vocab_size": int(hf["vocab_size"]), "tie_embeddings": bool(hf.get("tie_word_embeddings", True))}


def warn_approximation(hf: dict[str, Any]) -> None:
    """One line on stderr when the checkpoint was trained with tanh-approximate GELU."""
    act = hf.get("activation_function", "gelu_new")
    if act in _TANH_GELU:
        print(f"paratrain: note: this GPT-2 uses {act} (tanh GELU); paratrain's gpt uses exact GELU, "
              "so its logits differ by about 1e-3 until fine-tuned", file=sys.stderr)


def hf_config(m: Any, vocab: int) -> dict[str, Any]:
    """A ``config.json`` for ``GPT2LMHeadModel`` describing paratrain ``[model]`` ``m``."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
            "n_positions": m.max_seq_len, "n_embd": m.d_model, "n_layer": m.n_layer, "n_head": m.n_head,
            "n_inner": m.d_ff, "activation_function": _EXACT_GELU, "layer_norm_epsilon": 1e-5,
            "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
            "tie_word_embeddings": m.tie_embeddings, "dtype": "float32"}


def to_paratrain(name: str, t: Tensor, hf: dict[str, Any]) -> Named:
    """paratrain tensors from one GPT-2 tensor (old checkpoints lack the ``transformer.`` prefix)."""
    name = name.removeprefix("transformer.")
    if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
        return
    if (pt := rename(name, PLAIN)) is not None:
        yield pt, t
    elif (pt := rename(name, CONV1D)) is not None:
        yield pt, t.t()
    elif (w := rename(name, [(QKV[0], "{i}")])) is not None:
        for part, chunk in zip("qkv", t.t().chunk(3, dim=0), strict=True):
            yield f"layers.{w}.attn.{part}_proj.weight", chunk
    elif (b := rename(name, [(QKV[1], "{i}")])) is not None:
        for part, chunk in zip("qkv", t.chunk(3), strict=True):
            yield f"layers.{b}.attn.{part}_proj.bias", chunk
    else:
        raise ConfigError(f"GPT-2 checkpoint tensor {name} is unknown to the gpt adapter")


def to_hf(state: dict[str, Tensor], m: Any) -> Named:
    """GPT-2 tensors (with the ``transformer.`` prefix) from a paratrain gpt state dict."""
    for name, t in state.items():
        if name == "lm_head.weight":
            if not m.tie_embeddings:
                yield name, t
        elif (hf := rename(name, PLAIN, to_hf=True)) is not None:
            yield f"transformer.{hf}", t
        elif (hf := rename(name, CONV1D, to_hf=True)) is not None:
            yield f"transformer.{hf}", t.t()
    for i in range(m.n_layer):
        a = f"layers.{i}.attn."
        for kind, fused in (("weight", QKV[0]), ("bias", QKV[1])):
            parts = ([state[f"{a}qkv_proj.{kind}"]] if f"{a}qkv_proj.{kind}" in state
                     else [state[f"{a}{p}_proj.{kind}"] for p in "qkv"])
            joined = torch.cat(parts, dim=0)
            yield "transformer." + fused.replace("{i}", str(i)), joined.t() if kind == "weight" else joined


ADAPTER = Adapter(arch="gpt", model_types=("gpt2",), model_keys=model_keys, hf_config=hf_config,
                  to_paratrain=to_paratrain, to_hf=to_hf)
