"""Transformer building blocks shared by the GPT, Llama, seq2seq and BERT models.

Everything here is plain single-device code built from ``nn.Linear``/``nn.LayerNorm`` so
that parallelism can be applied from outside: tensor parallel shards the named linears
(``q_proj``/``k_proj``/``v_proj``/``fc1`` column-wise, ``out_proj``/``fc2`` row-wise),
activation checkpointing wraps a ``Block`` (full) or an ``AttentionCore`` (selective),
and FSDP shards one ``Block`` at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from paratrain.config import ModelConfig


class AttentionCore(nn.Module):
    """softmax(Q K^T / sqrt(d_head)) V over (B, H, T, d_head) tensors, via SDPA (K and V may
    have fewer heads than Q, a divisor of them: grouped-query attention).

    A parameter-free module of its own so that selective activation checkpointing can
    wrap (and recompute) just the attention scores.
    """

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        p = self.dropout if self.training else 0.0
        # fewer key/value heads than query heads: grouped-query attention, each k/v head serving
        # n_q / n_kv consecutive query heads (the grouping of Hugging Face's repeat_kv)
        gqa = k.shape[1] != q.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal,
                                              enable_gqa=gqa)


class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention with separate q/k/v/out projections.

    ``forward(x, kv=None, key_padding_mask=None)``: ``x`` is (B, T, d_model); ``kv`` is the
    sequence attended to (B, S, d_model), defaulting to ``x``; ``key_padding_mask`` is a
    bool (B, S) tensor with True at padding keys, which are masked out (combined with the
    causal mask when ``causal``).
    """

    def __init__(self, d_model: int, n_head: int, dropout: float, causal: bool, cross: bool = False) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"n_head = {n_head} does not divide d_model = {d_model}")
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.causal = causal
        self.cross = cross
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.core = AttentionCore(dropout)
        self.drop = nn.Dropout(dropout)
        self.qkv_proj: nn.Linear | None = None  # set by fuse_qkv (inference only)

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Replace ``q_proj``, ``k_proj``, ``v_proj`` by one Linear ``qkv_proj`` computing all three.

        For inference after training (self-attention only): one matmul instead of three, and a
        dynamically quantized model quantizes its input once instead of three times. Works on
        pruned widths (it concatenates whatever the three projections hold).
        """
        if self.cross:
            raise ValueError("fuse_qkv: cross-attention projects queries and keys from different inputs")
        if self.qkv_proj is not None:
            return
        parts = [self.q_proj, self.k_proj, self.v_proj]
        fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts),
                          bias=parts[0].bias is not None, device=parts[0].weight.device, dtype=parts[0].weight.dtype)
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = fused

    def _heads(self, t: Tensor) -> Tensor:
        # (B, T, F) -> (B, F // head_dim, T, head_dim). Under tensor parallel F is the local
        # shard of d_model, so the head count comes from the shape, never from self.n_head.
        b, n, f = t.shape
        return t.view(b, n, f // self.head_dim, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, kv: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        if self.qkv_proj is not None:
            if kv is not None:
                raise ValueError("a fused q/k/v projection serves self-attention only")
            q, k, v = (self._heads(t) for t in self.qkv_proj(x).chunk(3, dim=-1))
        else:
            src = x if kv is None else kv
            q = self._heads(self.q_proj(x))
            k = self._heads(self.k_proj(src))
            v = self._heads(self.v_proj(src))
        mask, is_causal = None, self.causal
        if key_padding_mask is not None:
            # SDPA's bool mask means "may attend"; it cannot be combined with is_causal.
            mask = ~key_padding_mask[:, None, None, :]
            if self.causal:
                t, s = q.shape[-2], k.shape[-2]
                mask = mask & torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
                is_causal = False
        y = self.core(q, k, v, mask, is_causal)
        b, h, t, d = y.shape
        y = y.transpose(1, 2).reshape(b, t, h * d)
        return self.drop(self.out_proj(y))


class FeedForward(nn.Module):
    """Position-wise MLP: ``fc1`` (d_model -> d_ff), GELU, ``fc2`` (d_ff -> d_model), dropout."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-LayerNorm Transformer layer: ``x + attn(ln1(x))``, then ``x + ffn(ln2(x))``."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_head, dropout, causal=causal)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff, dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), key_padding_mask=key_padding_mask)
        return x + self.ffn(self.ln2(x))


class DecoderBlock(nn.Module):
    """Pre-LayerNorm decoder layer: causal self-attention, cross-attention to the encoder
    output (``memory``), then the feed-forward network, each with its own LayerNorm."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_head, dropout, causal=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, n_head, dropout, causal=False, cross=True)
        self.ln3 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff, dropout)

    def forward(self, x: Tensor, memory: Tensor, memory_pad_mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.ln1(x))
        x = x + self.cross_attn(self.ln2(x), kv=memory, key_padding_mask=memory_pad_mask)
        return x + self.ffn(self.ln3(x))


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, computed in fp32 and cast
    back to the input dtype before the scale (as Hugging Face's Llama does)."""

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class DecoderLM(nn.Module):
    """What paratrain's decoder-only LMs (GPT, Llama) share: the pipeline stage protocol and
    greedy decoding.

    A pipeline chunk is the model itself with the other entries of ``layers`` deleted (keys
    stay "0".."n_layer-1", so parameter names stay stable) and the modules named in
    ``first_stage`` / ``last_stage`` set to None off the first / last stage.  ``forward``
    embeds integer input (token ids) and passes floating-point input (hidden states from the
    previous stage) straight to the layers; without ``norm``/``lm_head`` it returns hidden
    states.  A last stage whose head is tied to the embedding keeps ``tok_emb`` to hold the
    shared weight (see :mod:`paratrain.parallel.pipeline`).
    """

    first_stage: tuple[str, ...] = ("tok_emb",)
    last_stage: tuple[str, ...] = ("norm", "lm_head")

    def init_weights(self) -> None:
        """(Re-)tie the head to the embedding and initialize all parameters from the global
        torch seed (also after ``to_empty`` on a model built on the meta device)."""
        if self.cfg.tie_embeddings and self.tok_emb is not None and self.lm_head is not None:
            self.lm_head.weight = self.tok_emb.weight
        init_weights(self, self.cfg.n_layer)

    def head(self, x: Tensor) -> Tensor:
        """The final norm and LM head, where this stage has them."""
        if self.norm is not None:
            x = self.norm(x)
        if self.lm_head is not None:
            x = self.lm_head(x)
        return x

    def layer_modules(self) -> list[nn.Module]:
        """The repeated Transformer blocks (for FSDP / activation-checkpoint wrapping)."""
        return list(self.layers.values())

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, eos_id: int | None = None) -> Tensor:
        """Greedy decoding: append ``max_new_tokens`` argmax tokens to ``input_ids`` (B, T).

        The context is cropped to the last ``max_seq_len`` tokens. With ``eos_id``, a row
        that has produced it continues with ``pad_id``, and decoding stops once every row
        has. Returns prompt and continuation, (B, T + n_generated). Runs in eval mode.
        """
        was_training = self.training
        self.eval()
        out = input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self(out[:, -self.cfg.max_seq_len:])
            nxt = logits[:, -1].argmax(dim=-1)
            if eos_id is not None:
                nxt = nxt.masked_fill(done, self.pad_id)
                done = done | (nxt == eos_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return out


def build_token_stack(model: nn.Module, cfg: ModelConfig, vocab_size: int, pad_id: int, causal: bool) -> None:
    """Give ``model`` what GPT and BERT share: ``tok_emb`` + learned ``pos_emb``, ``drop``,
    ``layers`` (a ModuleDict "0".."n_layer-1" of causal or bidirectional blocks) and the
    final ``norm``."""
    model.cfg, model.vocab_size, model.pad_id = cfg, vocab_size, pad_id
    d = cfg.d_model
    model.tok_emb = nn.Embedding(vocab_size, d)
    model.pos_emb = nn.Embedding(cfg.max_seq_len, d)
    model.drop = nn.Dropout(cfg.dropout)
    model.layers = nn.ModuleDict(
        {str(i): Block(d, cfg.n_head, cfg.d_ff, cfg.dropout, causal=causal) for i in range(cfg.n_layer)}
    )
    model.norm = nn.LayerNorm(d)


def sinusoidal_positions(max_len: int, d_model: int) -> Tensor:
    """The fixed encoding of "Attention Is All You Need", shape (max_len, d_model):
    ``PE[p, 2i] = sin(p / 10000^(2i/d))`` and ``PE[p, 2i+1] = cos(p / 10000^(2i/d))``."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    angles = pos * inv_freq
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return pe


RESIDUAL_PROJECTIONS = ("out_proj", "fc2", "o_proj", "down_proj")  # write into the residual stream


def init_weights(model: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2 initialization: N(0, std) for Linear/Embedding weights, zero biases, unit
    LayerNorms and RMSNorms, and N(0, std / sqrt(2 * n_layer)) for the residual projections
    (``out_proj``/``o_proj`` and ``fc2``/``down_proj``). A tied weight is initialized once, by
    its first owner."""
    scaled = std / math.sqrt(2 * n_layer)
    seen: set[int] = set()

    def fresh(p: Tensor | None) -> bool:
        if p is None or id(p) in seen:
            return False
        seen.add(id(p))
        return True

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                if fresh(m.weight):
                    nn.init.normal_(m.weight, 0.0, scaled if name.endswith(RESIDUAL_PROJECTIONS) else std)
                if fresh(m.bias):
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                if fresh(m.weight):
                    nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, nn.LayerNorm):
                if fresh(m.weight):
                    nn.init.ones_(m.weight)
                if fresh(m.bias):
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                if fresh(m.weight):
                    nn.init.ones_(m.weight)


# ---- accounting -------------------------------------------------------------------------------


def count_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of unique parameters (a tied weight counts once). With ``exclude_embeddings``,
    the weights of every ``nn.Embedding`` (token and position tables, and a head tied to
    them) are left out."""
    skip: set[int] = set()
    if exclude_embeddings:
        skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def flops_per_token(model_cfg: ModelConfig, vocab_size: int, seq_len: int, arch: str | None = None) -> float:
    """Training FLOPs per token (forward + backward, no recomputation), PaLM-style:

        flops = 6 * N_matmul + 12 * d_model * seq_len * n_attn

    ``N_matmul`` counts the weights that take part in matrix multiplies (no biases,
    norms or embedding lookups): per self-attention layer ``4 d^2 + 2 d d_ff`` (Llama:
    ``2 d^2 + 2 d d_kv + 3 d d_ff``, ``d_kv = n_kv_head * d / n_head``), per
    decoder layer with cross-attention ``8 d^2 + 2 d d_ff``, plus the LM head ``V d`` (and
    BERT's MLM transform ``d^2``). ``n_attn`` is the number of attention score/value
    products a token takes part in: ``n_layer`` for GPT/BERT; for seq2seq (source and
    target length both ``seq_len``, counted per target token) ``n_enc + 2 * n_dec``, the
    decoder paying for self- and cross-attention. The causal mask is not discounted.
    The forward pass alone is a third of this.
    """
    arch = arch or model_cfg.arch
    d, ff, v = model_cfg.d_model, model_cfg.d_ff, vocab_size
    self_layer = 4 * d * d + 2 * d * ff
    if arch == "llama":  # q/o d x d, k/v d x d_kv (grouped-query), SwiGLU 3 d x d_ff
        kv = (model_cfg.n_kv_head or model_cfg.n_head) * (d // model_cfg.n_head)
        n_matmul = model_cfg.n_layer * (2 * d * d + 2 * d * kv + 3 * d * ff) + v * d
        n_attn = model_cfg.n_layer
    elif arch in ("gpt", "bert"):
        n_matmul = model_cfg.n_layer * self_layer + v * d + (d * d if arch == "bert" else 0)
        n_attn = model_cfg.n_layer
    elif arch == "seq2seq":
        n_enc, n_dec = model_cfg.n_layer, model_cfg.n_dec_layer or model_cfg.n_layer
        n_matmul = n_enc * self_layer + n_dec * (self_layer + 4 * d * d) + v * d
        n_attn = n_enc + 2 * n_dec
    else:
        raise ValueError(f"unknown arch {arch!r} (gpt | llama | seq2seq | bert)")
    return float(6 * n_matmul + 12 * d * seq_len * n_attn)
