"""Llama: a decoder-only Transformer with RMSNorm, rotary positions, SwiGLU and grouped-query attention.

Module and parameter names follow one layout that the Hugging Face adapter maps one to one
(``tok_emb``, ``layers.<i>.{attn_norm, attn.{q,k,v,o}_proj, ffn_norm, ffn.{gate,up,down}_proj}``,
``norm``, ``lm_head``); no linear has a bias.  Rotary embeddings use the non-interleaved
"rotate half" convention (a head's first half of dimensions pairs with its second half), so
Hugging Face Llama q/k weights load without a permutation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from paratrain.config import ModelConfig
from paratrain.models.blocks import AttentionCore, DecoderLM, RMSNorm, flops_per_token


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, each (seq_len, head_dim), in fp32: position ``p`` and
    frequency ``theta^(-2i/head_dim)`` at dims ``i`` and ``i + head_dim/2``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    angles = torch.arange(seq_len, device=device).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, head_dim) queries or keys by the (T, head_dim) tables."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention: ``n_head`` query heads share ``n_kv_head`` key/value
    heads; rotary positions on q and k; no biases.

    Under tensor parallel the projections are sharded by heads, so the local head counts
    come from the shapes (each rank holds whole query groups with their key/value head)."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, dropout: float) -> None:
        super().__init__()
        self.head_dim = d_model // n_head
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.q_proj = nn.Linear(d_model, n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * self.head_dim, d_model, bias=False)
        self.core = AttentionCore(dropout)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, f = t.shape
        return t.view(b, n, f // self.head_dim, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q = apply_rope(self._heads(self.q_proj(x)), cos, sin)
        k = apply_rope(self._heads(self.k_proj(x)), cos, sin)
        v = self._heads(self.v_proj(x))
        y = self.core(q, k, v, None, True)
        b, h, t, d = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, t, h * d))


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` with hidden size ``d_ff``, no biases."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """Pre-RMSNorm layer: ``x + attn(attn_norm(x))``, then ``x + ffn(ffn_norm(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.attn = LlamaAttention(d, cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.dropout)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.ffn = SwiGLU(d, cfg.d_ff)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Llama(DecoderLM):
    """Decoder-only LM: token embedding, ``n_layer`` :class:`LlamaBlock`, a final RMSNorm and an
    LM head (tied to ``tok_emb`` when ``cfg.tie_embeddings``).

    Pipeline stages follow :class:`~paratrain.models.blocks.DecoderLM`'s protocol.  The rotary
    tables are computed in each forward from ``model.rope_theta`` (no buffer: nothing to
    restore after a meta-device build).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int) -> None:
        super().__init__()
        self.cfg, self.vocab_size, self.pad_id = cfg, vocab_size, pad_id
        self.head_dim = cfg.d_model // cfg.n_head
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): LlamaBlock(cfg) for i in range(cfg.n_layer)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.init_weights()

    def forward(self, input_ids: Tensor) -> Tensor:
        """Token ids (B, T) -> logits (B, T, vocab); see the class docstring for stages."""
        x = input_ids
        t = x.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len = {self.cfg.max_seq_len}")
        if not torch.is_floating_point(x):
            x = self.tok_emb(x)
        cos, sin = rope_tables(t, self.head_dim, self.cfg.rope_theta, x.device)
        for layer in self.layers.values():
            x = layer(x, cos, sin)
        return self.head(x)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token; see :func:`paratrain.models.flops_per_token`."""
        return flops_per_token(self.cfg, self.vocab_size, seq_len, "llama")
