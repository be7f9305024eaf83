"""BERT: a bidirectional Transformer encoder with a masked-language-model head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from paratrain.config import ModelConfig
from paratrain.models.blocks import build_token_stack, flops_per_token, init_weights


class BERT(nn.Module):
    """Token + learned position embeddings, ``n_layer`` non-causal blocks that ignore
    padding keys (``input_ids == pad_id``), a final LayerNorm, and the MLM head:
    ``mlm_dense`` (d -> d), GELU, ``mlm_norm``, then ``lm_head`` (d -> vocab, with a bias;
    its weight tied to ``tok_emb`` when ``cfg.tie_embeddings``)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int) -> None:
        super().__init__()
        build_token_stack(self, cfg, vocab_size, pad_id, causal=False)
        d = cfg.d_model
        self.mlm_dense = nn.Linear(d, d)
        self.mlm_act = nn.GELU()
        self.mlm_norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab_size)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re-)tie the head to the embedding and initialize all parameters from the global
        torch seed (also after ``to_empty`` on a model built on the meta device)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        init_weights(self, self.cfg.n_layer)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Token ids (B, T) -> MLM logits (B, T, vocab) at every position."""
        t = input_ids.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len = {self.cfg.max_seq_len}")
        pad_mask = input_ids == self.pad_id
        x = self.tok_emb(input_ids) + self.pos_emb(torch.arange(t, device=input_ids.device))
        x = self.drop(x)
        for layer in self.layers.values():
            x = layer(x, key_padding_mask=pad_mask)
        x = self.norm(x)
        return self.lm_head(self.mlm_norm(self.mlm_act(self.mlm_dense(x))))

    def layer_modules(self) -> list[nn.Module]:
        """The repeated Transformer blocks (for FSDP / activation-checkpoint wrapping)."""
        return list(self.layers.values())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token; see :func:`paratrain.models.flops_per_token`."""
        return flops_per_token(self.cfg, self.vocab_size, seq_len, "bert")
