"""GPT: a decoder-only Transformer language model (learned positions, pre-LayerNorm)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from paratrain.config import ModelConfig
from paratrain.models.blocks import DecoderLM, build_token_stack, flops_per_token


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
        return self.head(x)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token; see :func:`paratrain.models.flops_per_token`."""
        return flops_per_token(self.cfg, self.vocab_size, seq_len, "gpt")
