"""The encoder-decoder Transformer of "Attention Is All You Need" (pre-LayerNorm variant)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from paratrain.config import ModelConfig
from paratrain.models.blocks import Block, DecoderBlock, flops_per_token, init_weights, sinusoidal_positions


class Encoder(nn.Module):
    """A stack of non-causal blocks with a key padding mask, then a final LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, h, ff, p = cfg.d_model, cfg.n_head, cfg.d_ff, cfg.dropout
        self.layers = nn.ModuleDict({str(i): Block(d, h, ff, p, causal=False) for i in range(cfg.n_layer)})
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers.values():
            x = layer(x, key_padding_mask=pad_mask)
        return self.norm(x)


class Decoder(nn.Module):
    """A stack of decoder blocks (causal self-attention + cross-attention), then a LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n = cfg.n_dec_layer or cfg.n_layer
        self.layers = nn.ModuleDict(
            {str(i): DecoderBlock(cfg.d_model, cfg.n_head, cfg.d_ff, cfg.dropout) for i in range(n)}
        )
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: Tensor, memory: Tensor, memory_pad_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers.values():
            x = layer(x, memory, memory_pad_mask)
        return self.norm(x)


class Seq2Seq(nn.Module):
    """Encoder-decoder Transformer with one token embedding shared by source and target
    (scaled by sqrt(d_model), plus sinusoidal positions) and an LM head tied to it when
    ``cfg.tie_embeddings``. Source positions equal to ``pad_id`` are masked out as keys in
    the encoder and in the decoder's cross-attention."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.register_buffer("pos_enc", sinusoidal_positions(cfg.max_seq_len, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re-)tie the head to the embedding, initialize parameters (seeded) and recompute
        the positional buffer, e.g. after ``to_empty`` on a model built on the meta device."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        pe = sinusoidal_positions(self.cfg.max_seq_len, self.cfg.d_model)
        self.pos_enc = pe.to(device=self.pos_enc.device, dtype=self.pos_enc.dtype)
        init_weights(self, max(self.cfg.n_layer, self.cfg.n_dec_layer))

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids (B, T) -> scaled token embedding + sinusoidal position, with dropout."""
        t = ids.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len = {self.cfg.max_seq_len}")
        return self.drop(self.tok_emb(ids) * math.sqrt(self.cfg.d_model) + self.pos_enc[:t])

    def encode(self, src: Tensor) -> Tensor:
        """Source ids (B, S) -> encoder output ``memory`` (B, S, d_model); its padding mask
        is ``src == self.pad_id``."""
        return self.encoder(self.embed(src), src == self.pad_id)

    def decode(self, memory: Tensor, src_pad_mask: Tensor | None, tgt_in: Tensor) -> Tensor:
        """Decoder input ids (B, T) attending to ``memory`` -> logits (B, T, vocab)."""
        return self.lm_head(self.decoder(self.embed(tgt_in), memory, src_pad_mask))

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, vocab) for source (B, S) and decoder input (B, T)."""
        return self.decode(self.encode(src), src == self.pad_id, tgt_in)

    def layer_modules(self) -> list[nn.Module]:
        """Encoder blocks, then decoder blocks (for FSDP / activation-checkpoint wrapping)."""
        return [*self.encoder.layers.values(), *self.decoder.layers.values()]

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per target token; see :func:`paratrain.models.flops_per_token`."""
        return flops_per_token(self.cfg, self.vocab_size, seq_len, "seq2seq")

    @torch.no_grad()
    def generate(self, src: Tensor, max_len: int, bos_id: int, eos_id: int) -> Tensor:
        """Greedy decoding from ``bos_id``: returns (B, n) generated tokens, BOS excluded,
        ``n <= max_len`` (<= max_seq_len). Each row ends with its first ``eos_id`` followed
        by ``pad_id``; decoding stops early once every row has produced ``eos_id``.
        Runs in eval mode."""
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len = {max_len} exceeds max_seq_len = {self.cfg.max_seq_len}")
        was_training = self.training
        self.eval()
        src_pad_mask = src == self.pad_id
        memory = self.encode(src)
        out = torch.full((src.shape[0], 1), bos_id, dtype=src.dtype, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            nxt = self.decode(memory, src_pad_mask, out)[:, -1].argmax(dim=-1)
            nxt = nxt.masked_fill(done, self.pad_id)
            done = done | (nxt == eos_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
        self.train(was_training)
        return out[:, 1:]
