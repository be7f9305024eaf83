"""model.arch = "llama": the model itself, its config checks, the planner's accounting of it, and
every parallel layout against one process (fp32, 10 steps, losses within 1e-5), plus tied
embeddings across pipeline stages for both decoder LMs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from paratrain.cli import main
from paratrain.config import Config, ModelConfig
from paratrain.models import Llama, build_model, count_params, flops_per_token
from paratrain.models.loss import token_loss_sum
from paratrain.parallel.memory_policy import apply_activation_checkpointing
from paratrain.parallel.pipeline import split_model
from paratrain.planner import flops
from paratrain.training.launch import launch
from tests.conftest import tiny_config
from tests.test_model_parallel import assert_parity, losses, run_group, summary

V = 50
LLAMA = ["--model.arch=llama", "--model.n_head=4", "--model.n_kv_head=2", "--train.steps=10", "--data.seq_len=16",
         "--checkpoint.keep=0", "--data.batch_size=8", "--model.rope_theta=500.0"]
LLAMA_UNTIED = [*LLAMA, "--model.tie_embeddings=false"]
GPT_TIED = ["--model.n_head=4", "--train.steps=10", "--data.seq_len=16", "--checkpoint.keep=0", "--data.batch_size=8"]
CKPT5 = ["--checkpoint.every=5", "--checkpoint.keep=2"]


def tiny(**kw) -> ModelConfig:
    base = dict(arch="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, max_seq_len=16)
    return ModelConfig(**{**base, **kw})


def make(seed: int = 0, **kw) -> Llama:
    torch.manual_seed(seed)
    return build_model(tiny(**kw), V, 0)


# ---- the model ------------------------------------------------------------------------------------


def test_names_shapes_and_causality():
    m = make()
    names = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert names["layers.1.attn.q_proj.weight"] == (32, 32) and names["layers.1.attn.k_proj.weight"] == (16, 32)
    assert names["layers.0.attn.v_proj.weight"] == (16, 32) and names["layers.0.attn.o_proj.weight"] == (32, 32)
    assert names["layers.0.ffn.gate_proj.weight"] == names["layers.0.ffn.up_proj.weight"] == (48, 32)
    assert names["layers.0.ffn.down_proj.weight"] == (32, 48) and names["norm.weight"] == (32,)
    assert {"layers.0.attn_norm.weight", "layers.0.ffn_norm.weight", "tok_emb.weight"} <= set(names)
    assert not any(n.endswith("bias") for n in names) and m.lm_head.weight is m.tok_emb.weight
    x = torch.randint(0, V, (2, 10))
    y = m(x)
    assert y.shape == (2, 10, V) and len(m.layer_modules()) == 2
    x2 = x.clone()
    x2[:, 6:] = (x2[:, 6:] + 1) % V  # the future does not change the past
    assert torch.allclose(m(x2)[:, :6], y[:, :6], atol=1e-6) and not torch.allclose(m(x2)[:, 6:], y[:, 6:])
    untied = make(tie_embeddings=False)
    assert count_params(untied) == count_params(m) + V * 32


def test_logits_equal_hugging_face_llama():
    """Same weights under Hugging Face's names -> the same logits: RoPE convention, RMSNorm, GQA."""
    transformers = pytest.importorskip("transformers", reason="an optional extra: pip install 'paratrain[hf]'")
    for tie in (False, True):
        hc = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                      rope_theta=500.0, rms_norm_eps=1e-6, tie_word_embeddings=tie)
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(hc).eval()
        with torch.no_grad():
            for n, p in hf.named_parameters():
                p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0.0, 0.3)
        ours = make(tie_embeddings=tie, rope_theta=500.0, norm_eps=1e-6).eval()
        rename = [("model.embed_tokens", "tok_emb"), ("model.layers", "layers"), ("model.norm", "norm"),
                  ("self_attn", "attn"), ("mlp", "ffn"), ("input_layernorm", "attn_norm"),
                  ("post_attention_layernorm", "ffn_norm")]
        state = {}
        for k, v in hf.state_dict().items():
            for a, b in rename:
                k = k.replace(a, b)
            state[k] = v
        ours.load_state_dict(state, strict=True)
        x = torch.randint(0, V, (2, 12))
        assert torch.allclose(hf(x).logits, ours(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_is_exact(mode):
    ref, ac = make(), make()
    assert apply_activation_checkpointing(ac, mode) == 2
    x = torch.randint(0, V, (2, 8))
    for m in (ref, ac):
        token_loss_sum(m(x), x).backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), ac.named_parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_pipeline_chunks_keep_single_device_names():
    for tie in (False, True):
        chunks = split_model(make(n_layer=4, tie_embeddings=tie), 2, [0, 1])
        assert chunks[0].lm_head is None and chunks[0].norm is None and len(chunks[0].layers) == 2
        names = [n for c in chunks.values() for n, _ in c.named_parameters()]
        full = [n for n, _ in make(n_layer=4, tie_embeddings=tie).named_parameters()]
        if tie:  # the last stage holds the shared weight as its head, under the same name
            assert chunks[1].lm_head.weight is chunks[1].tok_emb.weight and names.count("tok_emb.weight") == 2
            names.remove("tok_emb.weight")
        else:
            assert chunks[1].tok_emb is None
        assert sorted(names) == sorted(full)
    # the stages compose to the whole model
    m = make(n_layer=4, tie_embeddings=False)
    x = torch.randint(0, V, (2, 8))
    c = split_model(make(n_layer=4, tie_embeddings=False), 2, [0, 1])
    assert torch.allclose(c[1](c[0](x)), m(x), atol=1e-6)


# ---- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (["--model.n_kv_head=3"], "model.n_kv_head = 3 does not divide model.n_head = 4"),
    (["--model.n_kv_head=8"], "model.n_kv_head = 8 does not divide"),
    (["--model.n_kv_head=1", "--parallel.tp=2"], "model.n_kv_head = 1 is not divisible by parallel.tp = 2"),
    (["--model.rope_theta=nan"], "model.rope_theta = nan is not a finite number"),
    (["--model.norm_eps=0.0"], "model.norm_eps = 0.0 must be"),
    (["--model.d_model=36", "--model.n_head=4", "--model.n_kv_head=2"], "is odd; rotary embeddings"),
    (["--model.n_kv_head=-1"], "model.n_kv_head = -1 is below its minimum 0"),
])
def test_bad_llama_configs_exit_2_with_one_line(overrides, message, capsys, tmp_path):
    assert main(["train", f'--run.dir="{tmp_path}"', "--model.arch=llama", "--model.n_head=4", "--model.d_model=32",
                 "--parallel.nproc=2", *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# ---- the planner --------------------------------------------------------------------------------


@pytest.mark.parametrize("kv,tie", [(2, True), (1, False), (0, True)])
def test_planner_counts_llama_like_the_model(kv, tie):
    mc = tiny(n_kv_head=kv, tie_embeddings=tie, d_ff=40, max_seq_len=24)
    cfg = Config.default()
    cfg.model, cfg.data.seq_len = mc, 20
    spec = flops.spec_from_config(cfg)
    model = build_model(mc, flops.BYTE_VOCAB, 0)
    assert spec.params == count_params(model)
    assert sorted(tuple(p.shape) for p in model.parameters() if p.dim() == 2) == sorted(spec.matrices())
    assert spec.layer_params() == sum(p.numel() for p in model.layers["0"].parameters())
    assert spec.param_tensors() == len(list(model.layers["0"].parameters()))
    assert spec.flops_per_token() == flops_per_token(mc, flops.BYTE_VOCAB, 20) == model.flops_per_token(20)
    kvd = (kv or 4) * 8  # SwiGLU 3 d d_ff, GQA's k/v at d x d_kv
    assert spec.matmul_params() == 2 * (2 * 32 * 32 + 2 * 32 * kvd + 3 * 32 * 40) + flops.BYTE_VOCAB * 32


def test_planner_llama_memory_and_presets():
    gqa = flops.PRESETS["llama3-8b"][0]
    mha = gqa.with_(n_kv_head=0)
    assert 7.9e9 < gqa.params < 8.1e9  # Meta's published 8.03B
    a_gqa, a_mha = (m.activation_bytes_per_layer(s=8192, b=1, t=1) for m in (gqa, mha))
    h = gqa.d_model
    # GQA keeps K and V at n_kv / n_head of their MHA size: 2 * (1 - 8/32) * s b h elements of 2 bytes saved
    assert a_mha - a_gqa == pytest.approx(2 * 0.75 * 8192 * h * 2)
    gpt_like = dataclasses.replace(gqa, arch="gpt", n_kv_head=0, d_ff=4 * h)
    assert gpt_like.activation_bytes_per_layer(s=512, b=1, t=2) > 0


# ---- every layout against one process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("llama")

    def cfg(name: str, base: list[str], *extra: str, from_ckpt: str = "") -> Config:
        if from_ckpt:
            extra = (*extra, f'--checkpoint.path="{root / from_ckpt / "checkpoints" / "step_5"}"')
        return tiny_config(root / name, corpus, *base, *extra)

    for name, base in [("single", LLAMA), ("single_untied", LLAMA_UNTIED), ("gpt_single", GPT_TIED),
                       ("single4", [*LLAMA, "--model.n_layer=4"])]:
        assert launch(cfg(name, base, "--parallel.nproc=1"))["status"] == "ok"
    dp2 = ["--parallel.nproc=2", "--data.batch_size=4"]
    pp2 = ["--parallel.nproc=2", "--parallel.pp=2", "--parallel.microbatches=4"]
    run_group(2, [
        cfg("ddp2", LLAMA, *dp2),
        cfg("zero3", LLAMA, *dp2, "--parallel.zero=3"),
        cfg("tp2", LLAMA, "--parallel.nproc=2", "--parallel.tp=2", "--parallel.loss_parallel=true",
            "--train.activation_checkpointing=selective"),
        cfg("pp2", LLAMA, *pp2, "--train.activation_checkpointing=full", *CKPT5),
        cfg("pp2_untied", LLAMA_UNTIED, *pp2, "--parallel.pp_schedule=gpipe"),
        cfg("gpt_pp2", GPT_TIED, *pp2),
        cfg("ddp2_powersgd", LLAMA, *dp2, "--compression.gradient=powersgd"),
    ])
    assert launch(cfg("pp2_to_single", LLAMA, "--parallel.nproc=1", from_ckpt="pp2"))["status"] == "ok"
    assert launch(cfg("ps_sync", LLAMA, *dp2, "--parallel.sync=ps", "--ps.mode=sync"))["status"] == "ok"
    run_group(4, [
        cfg("dp2_tp2", LLAMA, "--parallel.nproc=4", "--parallel.tp=2", "--data.batch_size=4"),
        cfg("tp2_pp2", LLAMA, "--parallel.nproc=4", "--parallel.tp=2", "--parallel.pp=2",
            "--parallel.microbatches=4"),
        cfg("pp4", LLAMA, "--model.n_layer=4", "--parallel.nproc=4", "--parallel.pp=4", "--parallel.microbatches=4"),
    ])
    return root


@pytest.mark.parametrize("name", ["ddp2", "zero3", "tp2", "pp2", "dp2_tp2", "tp2_pp2", "ps_sync"])
def test_llama_layouts_match_single_process(runs, name):
    assert_parity(runs / "single", runs / name)


def test_untied_pipeline_and_strategy_names(runs):
    assert_parity(runs / "single_untied", runs / "pp2_untied")
    names = {"zero3": "fsdp", "tp2": "tp2", "pp2": "pp2-1f1b", "tp2_pp2": "tp2-pp2-1f1b", "dp2_tp2": "dp2-tp2"}
    for run, name in names.items():
        assert summary(runs / run)["strategy"] == name


def test_tied_embeddings_across_pipeline_stages(runs):
    assert_parity(runs / "gpt_single", runs / "gpt_pp2")
    assert_parity(runs / "single4", runs / "pp4")  # first and last stage in a group of their own


def test_tied_pipeline_checkpoint_resumes_in_one_process(runs):
    assert_parity(runs / "single", runs / "pp2_to_single", steps=range(6, 11))


def test_compressed_gradients_train_llama(runs):
    a, b = losses(runs / "single"), losses(runs / "ddp2_powersgd")
    assert summary(runs / "ddp2_powersgd")["status"] == "ok"
    assert b[10] < b[1] - 0.5 and all(abs(a[s] - b[s]) < 0.5 for s in a), (a, b)
