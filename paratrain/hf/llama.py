"""Llama family <-> paratrain ``llama``.

Names map one to one and no tensor changes: both sides use ``nn.Linear`` layout, separate
q/k/v/o projections without bias, and rotary embeddings in the rotate-half convention, so q and
k need no permutation.  Checkpoints paratrain's llama cannot express (rope scaling, attention or
MLP biases, another activation, a head size other than ``d_model / n_head``) are refused.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from paratrain.errors import ConfigError
from paratrain.hf.common import Adapter, Named, rename

PAIRS = [  # (HF name, paratrain name)
    ("model.embed_tokens.weight", "tok_emb.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q_proj.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.k_proj.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.v_proj.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.ffn.gate_proj.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.ffn.up_proj.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.ffn.down_proj.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def _rope(hf: dict[str, Any]) -> tuple[float, str]:
    """(theta, rope type): transformers 5 keeps them in ``rope_parameters``, 4 at the top level."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), str(kind)


def model_keys(hf: dict[str, Any]) -> dict[str, Any]:
    """paratrain ``[model]`` keys of a Llama ``config.json``."""
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    theta, kind = _rope(hf)
    if kind != "default":
        raise ConfigError(f"Llama rope type {kind!r} (rope scaling) is not supported by paratrain's llama; "
                          "only plain RoPE")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("Llama with attention_bias or mlp_bias has biases paratrain's llama lacks")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"Llama hidden_act = {hf['hidden_act']!r}; paratrain's llama uses SwiGLU (silu)")
    head_dim = hf.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise ConfigError(f"Llama head_dim = {head_dim} times {heads} heads is not hidden_size = {d}; "
                          "paratrain's llama needs head_dim = d_model / n_head")
    return {"arch": "llama", "n_layer": int(hf["num_hidden_layers"]), "n_head": heads,
            "n_kv_head": int(hf.get("num_key_value_heads") or heads), "d_model": d,
            "d_ff": int(hf["intermediate_size"]), "rope_theta": theta,
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "max_seq_len": int(hf.get("max_position_embeddings", 2048)), "vocab_size": int(hf["vocab_size"]),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}


def hf_config(m: Any, vocab: int) -> dict[str, Any]:
    """A ``config.json`` for ``LlamaForCausalLM`` describing paratrain ``[model]`` ``m``."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": m.d_model, "intermediate_size": m.d_ff, "num_hidden_layers": m.n_layer,
            "num_attention_heads": m.n_head, "num_key_value_heads": m.n_kv_head or m.n_head,
            "head_dim": m.d_model // m.n_head, "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
            "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "attention_bias": False, "mlp_bias": False, "attention_dropout": m.dropout,
            "tie_word_embeddings": m.tie_embeddings, "dtype": "float32"}


def to_paratrain(name: str, t: Tensor, hf: dict[str, Any]) -> Named:
    """paratrain tensors from one Llama tensor (rotary ``inv_freq`` buffers are skipped)."""
    if name.endswith("rotary_emb.inv_freq"):
        return
    pt = rename(name, PAIRS)
    if pt is None:
        raise ConfigError(f"Llama checkpoint tensor {name} is unknown to the llama adapter")
    yield pt, t


def to_hf(state: dict[str, Tensor], m: Any) -> Named:
    """Llama tensors from a paratrain llama state dict (``lm_head`` left out when tied)."""
    for name, t in state.items():
        if name == "lm_head.weight" and m.tie_embeddings:
            continue
        hf = rename(name, PAIRS, to_hf=True)
        if hf is not None:
            yield hf, t


ADAPTER = Adapter(arch="llama", model_types=("llama",), model_keys=model_keys, hf_config=hf_config,
                  to_paratrain=to_paratrain, to_hf=to_hf, free_keys=("max_seq_len",))
