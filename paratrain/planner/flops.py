"""Model description, parameter counts and FLOPs (Megatron / Korthikanti / PaLM accounting).

Notation follows the papers: ``l`` layers, ``h`` hidden size, ``a`` heads, ``s`` sequence
length, ``V`` vocabulary, ``B`` sequences per iteration (global batch).

* Parameters of a GPT (Narayanan et al. 2021, eq. 2)::

      P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h))

* Model FLOPs per iteration (Narayanan et al. 2021, eq. 3; Korthikanti et al. 2022, eq. 7)::

      F = 72 B s l h^2 (1 + s/(6h) + V/(12 l h))

  and with full activation recomputation (one more forward pass of every layer, not of
  the LM head) the hardware does ``96 B s l h^2 (1 + s/(6h) + V/(16 l h))``, i.e. 4/3 of
  the layer FLOPs.  Selective recomputation (Korthikanti et al., eq. 8) re-runs only the
  attention-score products, adding their forward cost ``4 B s^2 h`` per layer.

* Llama (Touvron et al. 2023): per layer the attention has ``2 h^2 + 2 h h_kv`` weights
  (``h_kv = n_kv_head * h / a``: grouped-query attention's smaller k/v projections, Ainslie et
  al. 2023) and the SwiGLU FFN three ``h x d_ff`` matrices; two RMSNorm vectors, no biases, no
  position table (rotary positions have no parameters).

* MFU (PaLM, Chowdhery et al. 2022, App. B) counts model FLOPs only; HFU counts what the
  hardware executed, recomputation included.

Nothing here imports torch: the planner stays a pure calculator.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from paratrain.mfu import mfu_from_step
from paratrain.planner.memory import activation_bytes_per_layer

RECOMPUTE_MODES = ("none", "selective", "full")
BYTE_VOCAB = 261  # vocab_size = 0 in a paratrain config means the byte tokenizer's 261 symbols


@dataclass(frozen=True)
class ModelSpec:
    """A Transformer as the planner sees it (one of paratrain's ``gpt | llama | seq2seq | bert``).

    ``seq`` is the training sequence length; ``max_seq`` sizes learned position tables
    (defaults to ``seq``).  For ``seq2seq`` ``n_layer`` counts encoder layers and
    ``n_dec_layer`` decoder layers (0: same as the encoder); source and target are ``seq``.
    ``n_kv_head`` (llama) is the number of key/value heads (0: ``n_head``).
    """

    name: str
    arch: str
    n_layer: int
    d_model: int
    n_head: int
    vocab: int
    seq: int
    d_ff: int = 0  # 0: 4 * d_model
    max_seq: int = 0  # 0: seq
    n_dec_layer: int = 0
    tied: bool = True
    dropout: bool = True  # dropout masks are part of the activations (paper assumption)
    n_kv_head: int = 0  # llama: grouped-query key/value heads; 0 = n_head

    @property
    def ff(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def pos(self) -> int:
        return self.max_seq or self.seq

    @property
    def n_dec(self) -> int:
        return (self.n_dec_layer or self.n_layer) if self.arch == "seq2seq" else 0

    @property
    def llama(self) -> bool:
        return self.arch == "llama"

    @property
    def kv_heads(self) -> int:
        """Key/value heads (what tensor parallel must divide)."""
        return (self.n_kv_head or self.n_head) if self.llama else self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of the k and v projections: ``kv_heads * d_model / n_head``."""
        return self.kv_heads * (self.d_model // self.n_head)

    @property
    def total_layers(self) -> int:
        """Layers a pipeline splits (encoder + decoder for seq2seq)."""
        return self.n_layer + self.n_dec

    def with_(self, **kw: Any) -> ModelSpec:
        return replace(self, **kw)

    # ---- parameters -------------------------------------------------------------------------
    def layer_params(self, decoder: bool = False) -> int:
        """Parameters of one block as paratrain builds it (linears with biases, 2-3 LayerNorms;
        llama: bias-free q/k/v/o and SwiGLU, 2 RMSNorms)."""
        h, f = self.d_model, self.ff
        if self.llama:
            return 2 * h * h + 2 * h * self.kv_dim + 3 * h * f + 2 * h
        attn = 4 * h * h + 4 * h
        mlp = 2 * h * f + f + h
        n = attn + mlp + 4 * h
        if decoder:
            n += attn + 2 * h  # cross-attention and its LayerNorm
        return n

    def embedding_params(self) -> int:
        """Token table (+ learned positions for gpt/bert; seq2seq uses fixed sinusoids)."""
        h = self.d_model
        return self.vocab * h + (self.pos * h if self.arch in ("gpt", "bert") else 0)  # llama: rotary

    def head_params(self) -> int:
        """Final LayerNorm(s) (llama: one RMSNorm), untied LM head, and BERT's MLM transform."""
        h = self.d_model
        n = h if self.llama else 2 * h * (2 if self.arch == "seq2seq" else 1)
        if not self.tied:
            n += self.vocab * h
        if self.arch == "bert":
            n += h * h + h + 2 * h + self.vocab  # mlm_dense, mlm_norm, lm_head bias
        return n

    def param_tensors(self, decoder: bool = False, tp_only: bool = False) -> int:
        """Parameter tensors of one block (weights and biases; LayerNorms unless ``tp_only``,
        which counts only the linears tensor parallelism shards)."""
        if self.llama:  # seven bias-free linears, two RMSNorm weights
            return 7 + (0 if tp_only else 2)
        linears = 8 + (8 if decoder else 0) + 4  # attention(s) q/k/v/out and fc1/fc2, weight + bias
        norms = 4 + (2 if decoder else 0)
        return linears + (0 if tp_only else norms)

    def matrices(self) -> list[tuple[int, int]]:
        """(rows, cols) of every weight matrix, tied ones once (what PowerSGD factors)."""
        h, f = self.d_model, self.ff
        layer = [(h, h)] * 4 + [(f, h), (h, f)]
        if self.llama:
            layer = [(h, h), (self.kv_dim, h), (self.kv_dim, h), (h, h), (f, h), (f, h), (h, f)]
        out = layer * self.n_layer + (layer + [(h, h)] * 4) * self.n_dec + [(self.vocab, h)]
        if self.arch in ("gpt", "bert"):
            out.append((self.pos, h))
        if not self.tied:
            out.append((self.vocab, h))
        if self.arch == "bert":
            out.append((h, h))
        return out

    @property
    def params(self) -> int:
        """Exact parameter count of paratrain's model of this shape (tied weights counted once)."""
        layers = self.n_layer * self.layer_params() + self.n_dec * self.layer_params(decoder=True)
        return layers + self.embedding_params() + self.head_params()

    # ---- FLOPs ------------------------------------------------------------------------------
    def matmul_params(self) -> int:
        """Weights that take part in matrix multiplies (per token, forward = 2x this)."""
        h, f = self.d_model, self.ff
        per = 2 * h * h + 2 * h * self.kv_dim + 3 * h * f if self.llama else 4 * h * h + 2 * h * f
        n = self.n_layer * per + self.n_dec * (per + 4 * h * h) + self.vocab * h
        if self.arch == "bert":
            n += h * h
        return n

    def attn_layers(self) -> int:
        """Score/value products a (target) token takes part in: decoder layers pay twice."""
        return self.n_layer + 2 * self.n_dec

    def activation_bytes_per_layer(self, s: int, b: int, t: int = 1, sp: bool = False, recompute: str = "none",
                                   elem_bytes: int = 2, flash: bool = False) -> float:
        """:func:`paratrain.planner.memory.activation_bytes_per_layer` for this model's layers
        (its d_ff, and for llama the k/v width of grouped-query attention and SwiGLU's tensors)."""

        h = self.d_model
        return activation_bytes_per_layer(s, b, h, self.n_head, t, sp, recompute, elem_bytes, self.dropout, flash,
                                          self.ff / h, kv_ratio=self.kv_heads / self.n_head, gated=self.llama)

    def flops_per_token(self, recompute: str = "none") -> float:
        """Training FLOPs per token: ``6 N_matmul + 12 h s n_attn`` (PaLM) plus recomputation."""
        h, s = self.d_model, self.seq
        base = 6.0 * self.matmul_params() + 12.0 * h * s * self.attn_layers()
        if recompute == "full":
            layer_fwd = 2.0 * (self.matmul_params() - self.vocab * h) + 4.0 * h * s * self.attn_layers()
            return base + layer_fwd
        if recompute == "selective":
            return base + 4.0 * h * s * self.attn_layers()
        if recompute != "none":
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
        return base


def model_flops_per_token(arch: str, n_layer: int, d_model: int, d_ff: int, vocab_size: int, seq_len: int,
                          n_dec_layer: int = 0, recompute: str = "none") -> float:
    """Training FLOPs per (target) token of a paratrain model (``gpt | seq2seq | bert``; llama's
    grouped-query k/v need :func:`spec_from_config`, here ``n_kv_head = n_head``).

    Model FLOPs (for MFU) with ``recompute = "none"``; hardware FLOPs (for HFU) otherwise.
    ``vocab_size = 0`` means the byte tokenizer (261).  This is what the trainer should
    multiply by tokens/s and divide by peak FLOP/s to report MFU.
    """
    spec = ModelSpec("model", arch, n_layer, d_model, 1, vocab_size or BYTE_VOCAB, seq_len, d_ff=d_ff,
                     n_dec_layer=n_dec_layer)
    return spec.flops_per_token(recompute)


def spec_from_config(cfg: Any, name: str = "config") -> ModelSpec:
    """The :class:`ModelSpec` of a :class:`paratrain.config.Config` (its model and data sections)."""
    m, d = cfg.model, cfg.data
    return ModelSpec(name, m.arch, m.n_layer, m.d_model, m.n_head, m.vocab_size or BYTE_VOCAB, d.seq_len,
                     d_ff=m.d_ff, max_seq=m.max_seq_len, n_dec_layer=m.n_dec_layer,
                     tied=m.tie_embeddings, dropout=m.dropout > 0, n_kv_head=m.n_kv_head)


# ---- the papers' closed forms ---------------------------------------------------------------------


def gpt_params(l: int, h: int, V: int, s: int) -> float:  # noqa: E741 - paper notation
    """P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h)) (Narayanan et al. 2021)."""
    return 12.0 * l * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))


def megatron_flops(B: int, s: int, l: int, h: int, V: int, recompute: str = "none") -> float:  # noqa: E741
    """FLOPs per iteration of a GPT with ``B`` sequences (forward + backward).

    ``none``: 72 B s l h^2 (1 + s/(6h) + V/(12 l h)) (model FLOPs);
    ``full``: 96 B s l h^2 (1 + s/(6h) + V/(16 l h));
    ``selective``: the model FLOPs plus one more forward of the attention scores (4 B s^2 h l).
    """
    if recompute == "full":
        return 96.0 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    base = 72.0 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))
    if recompute == "selective":
        return base + 4.0 * B * s * s * h * l
    if recompute != "none":
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    return base


# MFU (model FLOPs over peak) and HFU (executed FLOPs, recomputation included, over peak) are one
# division, made in paratrain.mfu for the trainer and the planner alike
mfu = hfu = mfu_from_step


def training_days(tokens: float, params: float, n_devices: int, flops_per_device: float,
                  recompute: bool = True) -> float:
    """End-to-end training time ~ 8 T P / (n X) with recomputation, 6 T P / (n X) without
    (Narayanan et al. 2021, eq. 4), in days."""
    k = 8.0 if recompute else 6.0
    return k * tokens * params / (n_devices * flops_per_device) / 86400.0


# ---- presets ---------------------------------------------------------------------------------------

def _gpt(name: str, l: int, h: int, a: int, s: int = 2048, V: int = 50257) -> ModelSpec:  # noqa: E741
    return ModelSpec(name, "gpt", l, h, a, V, s)


# name -> (model, default global batch in sequences)
PRESETS: dict[str, tuple[ModelSpec, int]] = {
    "gpt2-small": (_gpt("gpt2-small", 12, 768, 12, 1024), 512),
    "gpt2-medium": (_gpt("gpt2-medium", 24, 1024, 16, 1024), 512),
    "gpt2-large": (_gpt("gpt2-large", 36, 1280, 20, 1024), 512),
    "gpt2-xl": (_gpt("gpt2-xl", 48, 1600, 25, 1024), 512),
    "gpt3-1.3b": (_gpt("gpt3-1.3b", 24, 2048, 16), 512),
    "gpt3-2.7b": (_gpt("gpt3-2.7b", 32, 2560, 32), 512),
    "gpt3-6.7b": (_gpt("gpt3-6.7b", 32, 4096, 32), 1024),
    "gpt3-13b": (_gpt("gpt3-13b", 40, 5120, 40), 1024),
    "gpt3-175b": (_gpt("gpt3-175b", 96, 12288, 96), 1536),
    "gpt-1t": (_gpt("gpt-1t", 128, 25600, 160), 3072),
    "bert-base": (ModelSpec("bert-base", "bert", 12, 768, 12, 30522, 512), 256),
    "bert-large": (ModelSpec("bert-large", "bert", 24, 1024, 16, 30522, 512), 256),
    "t5-small": (ModelSpec("t5-small", "seq2seq", 6, 512, 8, 32128, 512, d_ff=2048), 128),
    "t5-base": (ModelSpec("t5-base", "seq2seq", 12, 768, 12, 32128, 512, d_ff=3072), 128),
    "llama2-7b": (ModelSpec("llama2-7b", "llama", 32, 4096, 32, 32000, 4096, d_ff=11008, tied=False,
                            dropout=False), 1024),
    "llama3-8b": (ModelSpec("llama3-8b", "llama", 32, 4096, 32, 128256, 8192, d_ff=14336, tied=False,
                            dropout=False, n_kv_head=8), 512),
    "llama3-70b": (ModelSpec("llama3-70b", "llama", 80, 8192, 64, 128256, 8192, d_ff=28672, tied=False,
                             dropout=False, n_kv_head=8), 512),
}
