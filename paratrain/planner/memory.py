"""Memory per rank: model states (DDP, ZeRO 1/2/3) and activations (Korthikanti et al. 2022).

Model states (Rajbhandari et al. 2020, "ZeRO", section 3 and figure 1), for Ψ parameters
on N data-parallel ranks, mixed-precision Adam (16-bit params and grads, K = 12 bytes of
fp32 master weights, momentum and variance per parameter):

    DDP 16Ψ;  ZeRO-1 4Ψ + 12Ψ/N;  ZeRO-2 2Ψ + 14Ψ/N;  ZeRO-3 16Ψ/N

The fp32 variants keep 4-byte params and grads and K = 8 (Adam's two moments; no master
copy), and SGD with momentum has K = 4 (fp32) or 8 (mixed: master + momentum).

Activations per Transformer layer (Korthikanti et al. 2022, section 4, 16-bit activations,
1-byte dropout masks, ``t``-way tensor parallelism):

    no parallelism          s b h (34 + 5 a s / h)
    tensor parallel         s b h (10 + 24/t + 5 a s / (h t))
    + sequence parallel     s b h (34/t + 5 a s / (h t))
    + selective recompute   s b h 34/t
    full recompute          2 s b h   (only the layer input)

:func:`activation_bytes_per_layer` derives these from the tensors a layer keeps, so it
also covers fp32, no dropout, fused (flash) attention and a d_ff other than 4h.
"""

from __future__ import annotations

ZERO_STAGES = (0, 1, 2, 3)


def optimizer_state_bytes(optimizer: str = "adamw", precision: str = "bf16") -> int:
    """K: optimizer bytes per parameter (fp32 master copy included in mixed precision)."""
    mixed = precision != "fp32"
    # Adam: m, v; SGD: momentum; 1-bit Adam: m, v, local v, error feedback
    moments = {"sgd": 4, "onebit_adam": 16}.get(optimizer, 8)
    return moments + (4 if mixed else 0)


def zero_model_states(psi: float, n: int, stage: int, k: int = 12, param_bytes: int = 2,
                      grad_bytes: int = 2) -> float:
    """Bytes of params + grads + optimizer state per rank for ZeRO ``stage`` (0 = DDP)."""
    p, g, o = param_bytes * psi, grad_bytes * psi, k * psi
    if stage == 0:
        return p + g + o
    if stage == 1:
        return p + g + o / n
    if stage == 2:
        return p + (g + o) / n
    if stage == 3:
        return (p + g + o) / n
    raise ValueError(f"ZeRO stage must be 0..3, got {stage}")


def activation_bytes_per_layer(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                               recompute: str = "none", elem_bytes: int = 2, dropout: bool = True,
                               flash: bool = False, ffn_mult: float = 4.0, kv_ratio: float = 1.0,
                               gated: bool = False) -> float:
    """Activation bytes one Transformer layer keeps for its backward pass.

    The tensors (in units of ``s b h`` elements of ``elem_bytes`` each, ``f = ffn_mult``):
    LayerNorm inputs 2; QKV input 1; Q, K 2 and V 1; output-projection input 1; MLP input 1,
    GeLU input f, fc2 input f; plus 1-byte dropout masks after attention and MLP (2 s b h
    bytes) and, without fused attention, the a s^2 b score tensors (softmax output, its
    dropout mask and output: 5 a s^2 b bytes at 16 bits).  Tensor parallelism splits Q, K,
    V, the output-projection input, the GeLU and fc2 inputs and the scores over ``t``;
    sequence parallelism splits the rest too.  With the paper's defaults (2 bytes,
    dropout, f = 4, unfused attention) this reproduces its five formulas exactly.

    Llama-style layers: grouped-query attention keeps K and V at ``kv_ratio = n_kv_head /
    n_head`` of their size, and a ``gated`` (SwiGLU) FFN keeps 4 f instead of GeLU's 2 f, as
    eager PyTorch saves them: the gate and up outputs, silu(gate), and their product (the
    down projection's input).  RMSNorm keeps its input like LayerNorm; rotary embeddings keep
    nothing beyond the rotated Q and K that attention keeps anyway.
    """
    sbh = float(s) * b * h
    e = float(elem_bytes)
    mask = 1.0 if dropout else 0.0
    if recompute == "full":
        return e * sbh / (t if sp else 1)
    replicated = e * (2 + 1 + 1) + 2 * mask  # LN inputs, QKV input, MLP input, 2 dropout masks
    ffn = (4 if gated else 2) * ffn_mult  # GeLU input + fc2 input; or gate, up, silu(gate), product
    split = e * (1 + 2 * kv_ratio + 1 + ffn)  # Q K V, out-proj input, the FFN's hidden tensors
    if flash:
        split += e  # a fused kernel keeps its output for backward
        scores = 0.0
    else:
        scores = (e + (mask + e if dropout else 0.0)) * a * s / h  # softmax out (+ mask + dropout out)
    if recompute == "selective":
        scores = 0.0
    elif recompute != "none":
        raise ValueError(f"recompute must be none | selective | full, got {recompute!r}")
    if sp:
        return sbh * (replicated + split + scores) / t
    return sbh * (replicated + (split + scores) / t)


def pipeline_inflight(pp: int, m: int, schedule: str = "1f1b", v: int = 1) -> float:
    """Micro-batches whose activations the first pipeline stage holds at its peak.

    1F1B: ``min(p, m)``; interleaved with ``v`` chunks per stage: ``p (1 + (p-1)/(p m))``;
    GPipe: all ``m``.  Without pipelining, one.
    """
    if pp <= 1:
        return 1.0
    if schedule == "gpipe":
        return float(m)
    base = float(min(pp, m))
    if schedule == "interleaved" and v > 1:
        return base * (1 + (pp - 1) / (pp * m))
    return base


def embedding_activation_bytes(s: int, b: int, h: int, vocab: int, t: int = 1, elem_bytes: int = 2,
                               logits_bytes: int = 4) -> float:
    """Output-layer activations on the last stage: final LayerNorm input, LM-head input and the
    logits with their gradient (``logits_bytes`` each; cross-entropy runs in fp32)."""
    return 2.0 * elem_bytes * s * b * h + 2.0 * logits_bytes * s * b * vocab / t
