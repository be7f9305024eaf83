"""Fast unit tests for paratrain.models (tiny models, CPU, one thread)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from paratrain.config import ModelConfig
from paratrain.models import BERT, GPT, Seq2Seq, build_model, count_params, flops_per_token
from paratrain.models.blocks import MultiHeadAttention, sinusoidal_positions

torch.set_num_threads(1)

V, PAD = 13, 0


def tiny(arch: str = "gpt", **kw) -> ModelConfig:
    base = dict(arch=arch, n_layer=2, n_head=2, d_model=16, d_ff=32, max_seq_len=12, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def make(arch: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny(arch, **kw), V, PAD).eval()


def ids(*shape: int, low: int = 1) -> torch.Tensor:
    return torch.randint(low, V, shape)


# ---- shapes, parameters, init ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt", "llama", "seq2seq", "bert"])
def test_shapes_and_layer_modules(arch):
    model = make(arch)
    x = ids(3, 7)
    out = model(x, ids(3, 5)) if arch == "seq2seq" else model(x)
    assert out.shape == ((3, 5, V) if arch == "seq2seq" else (3, 7, V))
    assert torch.isfinite(out).all()
    n_blocks = 4 if arch == "seq2seq" else 2
    assert len(model.layer_modules()) == n_blocks
    assert model.flops_per_token(8) == flops_per_token(model.cfg, V, 8, arch) > 0


@pytest.mark.parametrize("arch", ["gpt", "seq2seq", "bert"])
def test_tied_weights_and_count(arch):
    model = make(arch)
    assert model.lm_head.weight is model.tok_emb.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    total = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert count_params(model) == sum(unique.values()) == total - V * 16
    emb = V * 16 + (0 if arch == "seq2seq" else 12 * 16)  # seq2seq positions are a buffer
    assert count_params(model, exclude_embeddings=True) == count_params(model) - emb
    untied = make(arch, tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert count_params(untied) == count_params(model) + V * 16


def test_init_deterministic_and_scaled():
    a, b = make("gpt", seed=3), make("gpt", seed=3)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na
    torch.manual_seed(0)
    big = GPT(tiny(n_layer=8, d_model=64, n_head=4, d_ff=256), 500, PAD)
    assert abs(big.tok_emb.weight.std().item() - 0.02) < 2e-3
    assert abs(big.layers["0"].attn.out_proj.weight.std().item() - 0.02 / 4) < 1e-3
    assert abs(big.layers["0"].ffn.fc2.weight.std().item() - 0.02 / 4) < 1e-3
    assert big.layers["0"].attn.q_proj.bias.abs().sum() == 0


@pytest.mark.parametrize("arch", ["gpt", "llama", "seq2seq", "bert"])
def test_meta_device_init(arch):
    ref = make(arch)
    torch.manual_seed(0)
    ref.init_weights()  # the constructor's default inits consume RNG; re-init from the seed
    with torch.device("meta"):
        model = build_model(ref.cfg, V, PAD)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert model.lm_head.weight is model.tok_emb.weight
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    if arch == "seq2seq":
        assert torch.equal(model.pos_enc, ref.pos_enc)


def test_sinusoidal_positions():
    pe = sinusoidal_positions(10, 6)
    assert pe.shape == (10, 6)
    assert torch.allclose(pe[3, 2], torch.tensor(math.sin(3 / 10000 ** (2 / 6))))
    assert torch.allclose(pe[3, 3], torch.tensor(math.cos(3 / 10000 ** (2 / 6))))
    assert sinusoidal_positions(4, 5).shape == (4, 5)
    assert "pos_enc" not in make("seq2seq").state_dict()


def test_build_model_dispatch():
    assert isinstance(make("gpt"), GPT) and isinstance(make("seq2seq"), Seq2Seq)
    assert isinstance(make("bert"), BERT)
    with pytest.raises(ValueError, match=r"gpt \| llama \| seq2seq \| bert"):
        build_model(tiny("mamba"), V, PAD)


# ---- masks ------------------------------------------------------------------------------------


def test_gpt_causal():
    model = make("gpt")
    x = ids(2, 10)
    ref = model(x)
    for t in range(9):
        y = x.clone()
        y[:, t + 1] = (y[:, t + 1] % (V - 1)) + 1  # a different non-pad token
        out = model(y)
        assert torch.allclose(out[:, : t + 1], ref[:, : t + 1], atol=1e-6)
        assert not torch.allclose(out[:, t + 1], ref[:, t + 1])


def test_seq2seq_decoder_causal():
    model = make("seq2seq")
    src, tgt = ids(2, 6), ids(2, 8)
    ref = model(src, tgt)
    for t in range(7):
        y = tgt.clone()
        y[:, t + 1] = (y[:, t + 1] % (V - 1)) + 1
        assert torch.allclose(model(src, y)[:, : t + 1], ref[:, : t + 1], atol=1e-6)


def test_padding_does_not_leak():
    pad = torch.full((2, 4), PAD)
    bert, s2s = make("bert"), make("seq2seq")
    x = ids(2, 6)
    assert torch.allclose(bert(torch.cat([x, pad], 1))[:, :6], bert(x), atol=1e-5)
    src, tgt = ids(2, 5), ids(2, 4)
    src_padded = torch.cat([src, pad], 1)
    assert torch.allclose(s2s.encode(src_padded)[:, :5], s2s.encode(src), atol=1e-5)
    assert torch.allclose(s2s(src_padded, tgt), s2s(src, tgt), atol=1e-5)
    # per-row padding: row 0 has 5 real tokens, row 1 only 3
    ragged = src.clone()
    ragged[1, 3:] = PAD
    alone = bert(ragged[1:, :3])
    assert torch.allclose(bert(ragged)[1, :3], alone[0], atol=1e-5)


# ---- generation -------------------------------------------------------------------------------


def test_gpt_generate_matches_argmax_loop():
    model = make("gpt")
    x = ids(2, 4)
    out = model.generate(x, 10)  # 14 > max_seq_len exercises the context crop
    ref = x
    for _ in range(10):
        nxt = model(ref[:, -12:])[:, -1].argmax(-1, keepdim=True)
        ref = torch.cat([ref, nxt], 1)
    assert out.shape == (2, 14) and torch.equal(out, ref)


def test_gpt_generate_eos():
    model = make("gpt")
    x = ids(2, 3)
    free = model.generate(x, 6)
    eos = int(free[0, 3])  # row 0's first generated token
    out = model.generate(x, 6, eos_id=eos)
    expected, ends = free.clone(), []
    for row in range(2):
        hits = (free[row, 3:] == eos).nonzero()
        end = 3 + int(hits[0]) + 1 if len(hits) else 9
        expected[row, end:] = PAD
        ends.append(end)
    assert torch.equal(out, expected[:, : max(ends)])
    assert out[0, 3] == eos and (out[0, 4:] == PAD).all()


def test_seq2seq_generate():
    model = make("seq2seq")
    src = ids(3, 5)
    bos = 1
    out = model.generate(src, max_len=8, bos_id=bos, eos_id=V + 5)  # eos never produced
    assert out.shape == (3, 8)
    memory, mask = model.encode(src), src == PAD
    ref = torch.full((3, 1), bos)
    for _ in range(8):
        ref = torch.cat([ref, model.decode(memory, mask, ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref[:, 1:])
    # eos = row 0's first token: row 0 stops, then pads
    eos = int(out[0, 0])
    stopped = model.generate(src, max_len=8, bos_id=bos, eos_id=eos)
    assert stopped.shape[1] <= 8 and (stopped[0, 1:] == PAD).all()
    # every row ends: decoding stops early
    ones = model.generate(src[:1], max_len=8, bos_id=bos, eos_id=eos)
    assert ones.shape == (1, 1)
    with pytest.raises(ValueError):
        model.generate(src, max_len=13, bos_id=bos, eos_id=eos)


# ---- parallel readiness -----------------------------------------------------------------------


def test_tp_local_shards_forward():
    model = make("gpt")
    for block in model.layer_modules():
        attn = block.attn
        attn.q_proj, attn.k_proj, attn.v_proj = (nn.Linear(16, 8) for _ in range(3))
        attn.out_proj = nn.Linear(8, 16)
        block.ffn.fc1, block.ffn.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)
    assert model(ids(2, 6)).shape == (2, 6, V)
    s2s = make("seq2seq")
    for block in s2s.layer_modules():
        for attn in [m for m in block.modules() if hasattr(m, "q_proj")]:
            attn.q_proj, attn.k_proj, attn.v_proj = (nn.Linear(16, 8) for _ in range(3))
            attn.out_proj = nn.Linear(8, 16)
    assert s2s(ids(2, 5), ids(2, 4)).shape == (2, 4, V)


def test_pipeline_stages_compose():
    model = make("gpt")
    x = ids(2, 6)
    ref = model(x)
    first, last = make("gpt"), make("gpt")
    del first.layers["1"]
    first.norm = first.lm_head = None
    del last.layers["0"]
    last.tok_emb = last.pos_emb = None
    hidden = first(x)
    assert hidden.shape == (2, 6, 16)
    assert torch.allclose(last(hidden), ref, atol=1e-6)
    assert list(last.state_dict()) and all(not k.startswith("layers.0.") for k in last.state_dict())
    assert "layers.1.attn.q_proj.weight" in last.state_dict()


# ---- accounting -------------------------------------------------------------------------------


def test_flops_per_token_by_hand():
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=8, d_ff=32)
    per_layer = 4 * 64 + 2 * 8 * 32  # 768
    assert flops_per_token(cfg, 10, 4, "gpt") == 6 * (2 * per_layer + 80) + 12 * 2 * 8 * 4
    assert flops_per_token(cfg, 10, 4, "bert") == 6 * (2 * per_layer + 64 + 80) + 12 * 2 * 8 * 4
    cfg.n_dec_layer = 3
    n = 2 * per_layer + 3 * (per_layer + 256) + 80
    assert flops_per_token(cfg, 10, 4, "seq2seq") == 6 * n + 12 * 8 * 4 * (2 + 2 * 3)
    # without biases/norms/embeddings, 6 * N_matmul is 6 * (params that multiply matrices)
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(n_layer=2, n_head=2, d_model=8, d_ff=32, max_seq_len=4), 10, PAD)
    n_mat = sum(m.weight.numel() for m in gpt.modules() if isinstance(m, nn.Linear))
    assert flops_per_token(gpt.cfg, 10, 4) == 6 * n_mat + 12 * 2 * 8 * 4


def test_backward_runs():
    model = make("seq2seq").train()
    loss = model(ids(2, 5), ids(2, 4)).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_attention_causal_with_padding():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 2, 0.0, causal=True).eval()
    x = torch.randn(2, 7, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    out = attn(x, key_padding_mask=pad)
    assert torch.allclose(out[0, :5], attn(x[:1, :5])[0], atol=1e-6)  # pad keys ignored
    assert torch.allclose(out[1], attn(x[1:])[0], atol=1e-6)  # still causal
    assert torch.allclose(out[1, :3], attn(x[1:, :3])[0], atol=1e-6)


def test_selective_checkpoint_of_core():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model, ref = make("gpt").train(), make("gpt").train()
    for block in model.layer_modules():
        block.attn.core = checkpoint_wrapper(block.attn.core)
    x = ids(2, 6)
    model(x).square().mean().backward()
    ref(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
