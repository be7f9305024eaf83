"""GPT: a decoder-only Transformer language model (learned positions, pre-LayerNorm)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from paratrain.config import ModelConfig
from paratrain.models.blocks import build_token_stack, flops_per_token, init_weights


class GPT(nn.Module):
    """Decoder-only Transformer: token + learned position embeddings, ``n_layer`` causal
    blocks, a final LayerNorm and an LM head (tied to ``tok_emb`` when
    ``cfg.tie_embeddings``).

    Pipeline stages may set ``tok_emb``, ``norm`` or ``lm_head`` to None and delete entries
    of the ``layers`` ModuleDict (keys stay "0".."n_layer-1", so parameter names stay
    stable): without ``tok_emb`` the input is taken to be hidden states (B, T, d_model),
    and without ``norm``/``lm_head`` the hidden states are returned.
    """

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
        if self.tok_emb is not None:
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

    def layer_modules(self) -> list[nn.Module]:
        """The repeated Transformer blocks (for FSDP / activation-checkpoint wrapping)."""
        return list(self.layers.values())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token; see :func:`paratrain.models.flops_per_token`."""
        return flops_per_token(self.cfg, self.vocab_size, seq_len, "gpt")

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
