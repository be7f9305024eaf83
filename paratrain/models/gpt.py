"""GPT: a decoder-only Transformer language model (learned positions, pre-LayerNorm)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from paratrain.config import ModelConfig
from paratrain.models.blocks import DecoderLM, build_token_stack, flops_per_token, init_weights


class GPT(DecoderLM):
    """Decoder-only Transformer: token + learned position embeddings, ``n_layer`` causal
    blocks, a final LayerNorm and an LM head (tied to ``tok_emb`` when
    ``cfg.tie_embeddings``).

    Pipeline stages follow :class:`~paratrain.models.blocks.DecoderLM`'s protocol (the
    position table goes with the token embedding on the first stage).
    """

    first_stage = ("tok_emb", "pos_emb")

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int) -> None:
        super().__init__()
        build_token_stack(self, cfg, vocab_size, pad_id, causal=True)
        d = cfg.d_model
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re-)tie the head to the embedding and initialize all parameters from the global
        torch seed (also after ``to_empty`` on a model built on the meta device)."""
        if self.cfg.tie_embeddings and self.tok_emb is not None and self.lm_head is not None:
            self.lm_head.weight = self.tok_emb.weight
        init_weights(self, self.cfg.n_layer)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Token ids (B, T) -> logits (B, T, vocab); see the class docstring for stages."""
        x = input_ids
        if not torch.is_floating_point(x):
            t = input_ids.shape[1]
            if t > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {t} exceeds max_seq_len = {self.cfg.max_seq_len}")
            x = self.tok_emb(input_ids)
            if self.pos_emb is not None:
                x = x + self.pos_emb(torch.arange(t, device=input_ids.device))
            x = self.drop(x)
        for layer in self.layers.values():
            x = layer(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.lm_head is not None:
            x = self.lm_head(x)
        return x

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token; see :func:`paratrain.models.flops_per_token`."""
        return flops_per_token(self.cfg, self.vocab_size, seq_len, "gpt")
