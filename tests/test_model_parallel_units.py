"""Model-parallel building blocks in one process: layouts rejected up front, pipeline
partitioning, activation checkpointing, fp16 loss scaling, mixed precision, DCP round trip."""

from __future__ import annotations

import json

import pytest
import torch

from paratrain.cli import main
from paratrain.config import Config, ConfigError, ModelConfig
from paratrain.models import build_model
from paratrain.models.loss import token_loss_sum
from paratrain.parallel.dims import ParallelDims
from paratrain.parallel.memory_policy import LossScaler, apply_activation_checkpointing
from paratrain.parallel.model_parallel import layout_name
from paratrain.parallel.pipeline import partition, split_model
from paratrain.training.launch import launch
from tests.conftest import tiny_config

BAD_LAYOUTS = [
    (["--parallel.nproc=4", "--parallel.dp=3", "--parallel.tp=2"], "dp * tp * pp = 3 * 2 * 1 = 6"),
    (["--parallel.nproc=3", "--parallel.tp=2"], "not divisible by tp * pp"),
    (["--parallel.nproc=4", "--parallel.tp=4", "--model.n_head=2"], "model.n_head = 2 is not divisible"),
    (["--parallel.nproc=4", "--parallel.tp=4", "--model.n_head=4", "--model.d_ff=66"], "model.d_ff = 66"),
    (["--parallel.nproc=4", "--parallel.pp=4", "--model.tie_embeddings=false"], "exceeds model.n_layer = 2"),
    (["--parallel.nproc=2", "--parallel.tp=2", "--model.arch=llama", "--model.n_kv_head=1"],
     "model.n_kv_head = 1 is not divisible by parallel.tp = 2"),
    (["--parallel.nproc=2", "--parallel.pp=2", "--model.tie_embeddings=false", "--parallel.pp_schedule=interleaved"],
     "pp * virtual_stages = 2 * 2 exceeds"),
    (["--parallel.nproc=2", "--parallel.pp=2", "--model.tie_embeddings=false", "--parallel.microbatches=3"],
     "not divisible by parallel.microbatches = 3"),
    (["--parallel.nproc=2", "--parallel.pp=2", "--model.tie_embeddings=false", "--parallel.zero=3"],
     "zero > 0 with pp"),
    (["--parallel.nproc=4", "--parallel.tp=2", "--parallel.zero=1"], "zero = 1 works with plain data parallel"),
    (["--parallel.nproc=2", "--parallel.tp=2", "--parallel.zero=3"], "but dp = 1"),
    (["--parallel.nproc=2", "--parallel.zero=1", "--parallel.cpu_offload=true"], "cpu_offload needs"),
    (["--parallel.nproc=2", "--parallel.tp=2", '--compression.gradient="int8"'], "compresses DDP gradients"),
    (["--parallel.nproc=2", "--parallel.pp=2", "--model.arch=seq2seq", '--data.source="synthetic:reverse"'],
     "splits the decoder LMs (model.arch = 'gpt' or 'llama')"),
    (["--parallel.nproc=2", "--parallel.sync=ps", "--train.precision=fp16"], "set train.precision = 'bf16'"),
]


@pytest.mark.parametrize("overrides,message", BAD_LAYOUTS)
def test_invalid_layouts_exit_2_with_one_line(overrides, message, capsys, tmp_path):
    assert main(["train", f'--run.dir="{tmp_path}"', "--model.n_layer=2", "--data.batch_size=4",
                 *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_world_size_must_be_the_product_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("RANK", "0")
    cfg = Config.load(None, ["--parallel.nproc=4", "--parallel.tp=4"])
    with pytest.raises(ConfigError, match="world size 6 != dp \\* tp \\* pp"):
        ParallelDims.from_env(cfg, init=False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    d = ParallelDims.from_env(Config.load(None, ["--parallel.nproc=8", "--parallel.tp=2", "--parallel.pp=2",
                                                 "--model.tie_embeddings=false"]), init=False)
    assert (d.dp, d.pp, d.tp) == (2, 2, 2)
    d.rank = 7  # mesh order dp, pp, tp: rank 7 = (1, 1, 1)
    assert (d.dp_rank, d.pp_rank, d.tp_rank) == (1, 1, 1)


def test_layout_names():
    def name(*o):
        cfg = Config.load(None, ["--model.tie_embeddings=false", "--model.n_layer=4", *o])
        d = ParallelDims(world_size=cfg.parallel.nproc, dp=cfg.dp, tp=cfg.parallel.tp, pp=cfg.parallel.pp)
        return layout_name(cfg, d)
    assert name("--parallel.zero=1") == "zero1"
    assert name("--parallel.zero=3", "--parallel.cpu_offload=true") == "fsdp-offload"
    assert name("--parallel.nproc=2", "--parallel.tp=2") == "tp2"
    assert name("--parallel.nproc=4", "--parallel.tp=2") == "dp2-tp2"
    assert name("--parallel.nproc=2", "--parallel.pp=2", "--parallel.pp_schedule=gpipe") == "pp2-gpipe"
    assert name("--parallel.nproc=8", "--parallel.tp=2", "--parallel.pp=2") == "dp2-tp2-pp2-1f1b"


def test_partition_balances_parameters_with_embeddings_first_and_head_last():
    assert partition([1] * 8, 2) == [(0, 4), (4, 8)]
    assert partition([1] * 8, 2, first_extra=4) == [(0, 2), (2, 8)]
    b = partition([1] * 8, 4, last_extra=3)
    assert b[-1] == (7, 8) and max(hi - lo for lo, hi in b) == 3 and b[0][0] == 0 and b[-1][1] == 8
    with pytest.raises(ValueError):
        partition([1, 1], 3)
    cfg = ModelConfig(n_layer=4, n_head=2, d_model=16, d_ff=32, tie_embeddings=False)
    chunks = split_model(build_model(cfg, 50, 0), 2, [0, 1])
    assert chunks[0].lm_head is None and chunks[1].tok_emb is None
    names = [n for c in chunks.values() for n, _ in c.named_parameters()]
    full = [n for n, _ in build_model(cfg, 50, 0).named_parameters()]
    assert sorted(names) == sorted(full)  # single-device names, each on exactly one stage


@pytest.mark.parametrize("arch", ["gpt", "seq2seq"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_is_exact(arch, mode):
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=2, d_model=16, d_ff=32, max_seq_len=16)
    torch.manual_seed(0)
    ref = build_model(cfg, 40, 0)
    torch.manual_seed(0)
    ac = build_model(cfg, 40, 0)
    wrapped = {("gpt", "full"): 2, ("gpt", "selective"): 2, ("seq2seq", "full"): 4, ("seq2seq", "selective"): 6}
    assert apply_activation_checkpointing(ac, mode) == wrapped[arch, mode]
    assert list(ac.state_dict()) == list(ref.state_dict())  # checkpoints are unaffected
    x = torch.randint(1, 40, (2, 8))
    kw = {"input_ids": x} if arch == "gpt" else {"src": x, "tgt_in": x}
    for m in (ref, ac):
        token_loss_sum(m(**kw), x).backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), ac.named_parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_loss_scaler_skips_overflow_and_unscales():
    p = torch.nn.Parameter(torch.ones(3))
    s = LossScaler(init_scale=8.0, growth_interval=2)
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not s.unscale_([p], distributed=False) and s.scale == 4.0 and s.skipped == 1
    p.grad = torch.tensor([4.0, 8.0, 0.0])
    assert s.unscale_([p], distributed=False) and torch.equal(p.grad, torch.tensor([1.0, 2.0, 0.0]))
    p.grad = torch.zeros(3)
    assert s.unscale_([p], distributed=False) and s.scale == 8.0  # grew after 2 good steps


def test_mixed_precision_trains_close_to_fp32(tmp_path, corpus):
    out = {}
    for prec in ("fp32", "bf16", "fp16"):
        run = tmp_path / prec
        assert launch(tiny_config(run, corpus, "--parallel.nproc=1", "--train.steps=6", "--checkpoint.keep=0",
                                  f"--train.precision={prec}"))["status"] == "ok"
        out[prec] = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    for prec in ("bf16", "fp16"):
        assert all(abs(a - b) < 2e-2 for a, b in zip(out["fp32"], out[prec], strict=True)), (prec, out)


def test_dcp_round_trip_in_one_process(tmp_path):
    from paratrain.parallel import dist_checkpoint

    cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, d_ff=32, max_seq_len=16)

    def model_and_opt(seed):
        torch.manual_seed(seed)
        m = build_model(cfg, 40, 0)
        return m, torch.optim.AdamW(m.parameters(), lr=1e-2)

    m, opt = model_and_opt(0)
    x = torch.randint(1, 40, (2, 8))
    token_loss_sum(m(x), x).backward()
    opt.step()
    (tmp_path / "ck").mkdir()
    dist_checkpoint.save(tmp_path / "ck", [m], opt)
    m2, opt2 = model_and_opt(1)
    dist_checkpoint.load(tmp_path / "ck", [m2], opt2)
    for (n, a), b in zip(m.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    for p, q in zip(m.parameters(), m2.parameters(), strict=True):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], opt2.state[q][k])
    full = torch.load(tmp_path / "ck" / "model.pt", weights_only=True)
    assert set(full) == set(m.state_dict())
