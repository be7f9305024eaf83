"""Model compression: pruning, quantization, distillation, export and the `compress` report."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch

import paratrain.model_compression.distill as D
import paratrain.model_compression.export as E
import paratrain.model_compression.pruning as P
import paratrain.model_compression.quantization as Q
from paratrain import checkpoint as ckpt
from paratrain.cli import main
from paratrain.config import Config
from paratrain.data import build_data, val_batches
from paratrain.models import build_model
from paratrain.models.loss import lm_loss_sum
from paratrain.training.launch import launch
from tests.conftest import tiny_config

SMALL = ["--model.n_layer=2", "--model.n_head=4", "--model.d_model=32", "--model.d_ff=64"]


def small_model(arch: str = "gpt", seed: int = 0) -> torch.nn.Module:
    extra = ["--model.arch=seq2seq", "--data.source=synthetic:reverse"] if arch == "seq2seq" else []
    cfg = Config.load(None, SMALL + ["--model.max_seq_len=32", "--data.seq_len=16"] + extra)
    torch.manual_seed(seed)
    return build_model(cfg.model, 261, 0).eval()


def inputs(arch: str = "gpt", batch: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 261, (batch, 16), generator=g)
    if arch == "seq2seq":
        return {"src": ids, "tgt_in": torch.randint(3, 261, (batch, 12), generator=g)}
    return {"input_ids": ids}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A tiny GPT trained for 30 steps (one process), with its run dir and validation batches."""
    run = tmp_path_factory.mktemp("run")
    cfg = tiny_config(run, corpus, "--parallel.nproc=1", "--train.steps=30", "--checkpoint.keep=1",
                      "--data.batch_size=8", "--model.n_head=4")
    assert launch(cfg)["status"] == "ok"
    cfg = Config.load(run / "config.toml")
    from paratrain.model_compression.recipe import load_checkpoint

    _, model, _ = load_checkpoint(run)
    return run, cfg, model, val_batches(build_data(cfg), 8, max_batches=2)


# ---- pruning -----------------------------------------------------------------------------------


def test_global_magnitude_hits_exact_sparsity_and_schedules():
    m = small_model()
    total = sum(lin.weight.numel() for _, lin in P.prunable_linears(m))
    assert all(name != "lm_head" for name, _ in P.prunable_linears(m))  # tied to the embedding
    for s in (0.37, 0.5, 0.9):
        P.prune_global(m, s)
        zeros = sum(int((lin.weight == 0).sum()) for _, lin in P.prunable_linears(m))
        assert zeros == round(s * total)
    # gradual (cubic) schedule: exact at every step, masks only grow, final at end_step
    m = small_model()
    pr = P.MagnitudePruner(m, 0.8, end_step=10)
    prev = None
    for step in range(13):
        s = pr.update(step)
        assert s == pytest.approx(P.cubic_sparsity(step, 0.8, 0, 10))
        assert P.weight_sparsity(m) == pytest.approx(round(s * total) / total)
        keep = torch.cat([mk.flatten() for mk in pr.masks])
        assert prev is None or not (keep & ~prev).any()
        prev = keep
    assert P.weight_sparsity(m) == pytest.approx(0.8, abs=1e-4)
    assert P.cubic_sparsity(5, 0.8, 0, 10) > 0.4  # cubic: most of the pruning happens early
    # N:M
    m = small_model()
    pr = P.MagnitudePruner(m, method="nm", n=2, m=4)
    pr.update(0)
    for _, lin in pr.linears:
        assert ((lin.weight.reshape(lin.out_features, -1, 4) != 0).sum(-1) <= 2).all()
    assert P.weight_sparsity(m) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("arch", ["gpt", "seq2seq"])
@pytest.mark.parametrize("rank_by", ["norm", "sensitivity"])
def test_structured_pruning_is_exact_when_removed_units_are_zero(arch, rank_by):
    m = small_model(arch)
    x = inputs(arch)
    with torch.no_grad():
        for ffn in (mod for mod in m.modules() if isinstance(mod, P.FeedForward)):
            ffn.fc2.weight[:, 7:39] = 0  # half of d_ff = 64
        for mha in (mod for mod in m.modules() if isinstance(mod, P.MultiHeadAttention)):
            mha.out_proj.weight[:, 8:24] = 0  # heads 1 and 2 of 4 (head_dim 8)
        before = m(**x)
    n_before = sum(p.numel() for p in m.parameters())
    labels = torch.randint(3, 261, before.shape[:2])
    batch = {**x, "labels": labels}
    P.prune_structured(m, 0.5, "both", rank_by, [batch])
    with torch.no_grad():
        after = m(**x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    for mod in m.modules():
        if isinstance(mod, P.FeedForward):
            assert mod.fc1.weight.shape == (32, 32) and mod.fc2.weight.shape == (32, 32)
        if isinstance(mod, P.MultiHeadAttention):
            assert mod.q_proj.weight.shape == (16, 32) and mod.out_proj.weight.shape == (32, 16)
    assert sum(p.numel() for p in m.parameters()) < 0.75 * n_before


# ---- quantization ------------------------------------------------------------------------------


def test_dynamic_int8_within_tolerance_and_qat_matches_kernels(trained):
    _, _, model, val = trained
    q = Q.quantize_dynamic_int8(model)
    assert type(q.lm_head) is torch.nn.Linear and q.lm_head.weight is q.tok_emb.weight  # tied head shared
    # q/k/v fused: qkv_proj, out_proj, fc1, fc2 in each of the 2 layers
    assert sum(isinstance(mod, Q.dynamic_linear_class()) for mod in q.modules()) == 8
    x = {"input_ids": val[0]["input_ids"]}
    with torch.no_grad():
        ref, out = model(**x), q(**x)
        unfused = Q.quantize_dynamic_int8(model, fuse=False)(**x)
    # the three projections share their input (one activation scale) and keep per-row weight scales
    assert (out - unfused).abs().max() <= 1e-4 * (ref.max() - ref.min())
    # stated tolerance (docs/model-compression.md): max |logit error| <= 2% of the fp32 logit range,
    # and the top-1 prediction agrees on >= 97% of positions
    assert (out - ref).abs().max() <= 0.02 * (ref.max() - ref.min())
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.97
    # QAT's fake quantization simulates the int8 kernels: much closer to them than fp32 is,
    # and converting it gives exactly quantize_dynamic of the same weights
    fq = Q.prepare_qat(copy.deepcopy(model))
    with torch.no_grad():
        sim = fq(**x)
        assert (sim - out).abs().mean() < 0.5 * (ref - out).abs().mean()
        torch.testing.assert_close(Q.convert_qat(fq)(**x), out, atol=0, rtol=0)
    fq = Q.prepare_qat(copy.deepcopy(model)).train()
    lm_loss_sum(fq, val[0]).backward()
    assert fq.layers["0"].ffn.fc1.weight.grad.abs().sum() > 0  # straight-through gradients


# ---- export ------------------------------------------------------------------------------------


def test_exported_models_reload_with_identical_outputs(trained, tmp_path):
    _, _, model, val = trained
    x = {"input_ids": val[0]["input_ids"]}
    sparse = copy.deepcopy(model)
    P.prune_global(sparse, 0.6)
    structured = copy.deepcopy(model)
    P.prune_structured(structured, 0.5, "both")
    variants = {
        "fp32": model, "sparse": sparse, "structured": structured,
        "int8": Q.quantize_embeddings_int8(Q.quantize_dynamic_int8(structured)),
        "int8-sparse": Q.quantize_dynamic_int8(sparse),
        "int4": Q.quantize_weight_only(model, 4), "int8-weight": Q.quantize_weight_only(model, 8),
        "static": Q.quantize_static_int8(model, val),
        "student": D.make_student(model, 1),
    }
    sizes = {}
    for name, m in variants.items():
        path = E.save_model(m, tmp_path / f"{name}.safetensors")
        sizes[name] = path.stat().st_size
        back = E.load_model(path)
        with torch.no_grad():
            torch.testing.assert_close(back(**x), m(**x), atol=0, rtol=0, msg=name)
    assert sizes["sparse"] < 0.7 * sizes["fp32"]  # zeros are stored as a bitmask
    assert sizes["int8-sparse"] < sizes["int8-weight"] and sizes["int8"] < 0.4 * sizes["structured"]
    # loading a file into a model of another shape fails with a clear message
    spec, tensors = E.read_file(tmp_path / "structured.safetensors")
    msg = r"'layers.0.attn.q_proj.weight' has shape \[16, 32\] but the model expects \[32, 32\]"
    with pytest.raises(E.ExportError, match=msg):
        E.load_tensors(copy.deepcopy(model), tensors, spec["tied"], "structured.safetensors")
    # the int8 file loads and runs without paratrain's training code
    code = ("import sys, torch; from paratrain.model_compression.export import load_model; "
            f"m = load_model({str(tmp_path / 'int8.safetensors')!r}); "
            "m(torch.randint(3, 200, (2, 16))); "
            "bad = [k for k in sys.modules if k.startswith(('paratrain.training.', 'paratrain.data', "
            "'paratrain.parallel'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- distillation ------------------------------------------------------------------------------


def test_distillation_student_loss_on_teacher_falls(trained, tmp_path):
    _, cfg, teacher, val = trained
    loss = D.DistillLoss(teacher, temperature=2.0, alpha=0.0)
    torch.testing.assert_close(loss(teacher, val[0]), lm_loss_sum(teacher, val[0]))  # alpha = 0: hard loss
    picked = D.make_student(teacher, 1)  # layer dropping keeps the last block
    assert len(picked.layers) == 1 and picked.cfg.n_layer == 1 and teacher.cfg.n_layer == 2
    assert torch.equal(picked.layers["0"].ffn.fc1.weight, teacher.layers["1"].ffn.fc1.weight)
    torch.manual_seed(3)
    student = build_model(picked.cfg, teacher.vocab_size, teacher.pad_id)  # a fresh 1-layer student
    before = D.teacher_kl(student, teacher, val)
    summary = D.finetune(cfg, student, D.DistillLoss(teacher, 2.0, 1.0), steps=12, run_dir=tmp_path / "d",
                         lr=3e-3, batch_size=8)
    assert summary["status"] == "ok" and summary["steps"] == 12
    after = D.teacher_kl(student, teacher, val)
    assert after < 0.8 * before, (before, after)
    assert all(not p.requires_grad for p in teacher.parameters())


# ---- the compress verb -------------------------------------------------------------------------


def test_compress_report_fields_and_bytes_match_files(trained, tmp_path, capsys):
    run, _, _, _ = trained
    out = tmp_path / "out"
    args = ["compress", str(run), "--prune", "0.5", "--prune-method", "ffn", "--finetune-steps", "3",
            "--quantize", "int8", "--out", str(out), "--json", "--repeats", "2", "--eval-batches", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["original", "pruned", "int8"]
    for s in report["stages"]:
        for key in ("name", "params", "nonzero_params", "bytes_on_disk", "latency_ms_b1", "latency_ms_b16",
                    "val_loss", "val_acc"):
            assert key in s, key
        assert s["bytes_on_disk"] == sum((out / f).stat().st_size for f in s["files"])
        assert 0 < s["nonzero_params"] <= s["params"] and s["latency_ms_b1"] > 0 and s["val_loss"] > 0
        assert s["val_acc"] is None  # LM data has no exact answers
    orig, pruned, int8 = report["stages"]
    assert pruned["params"] < orig["params"] and int8["params"] == pruned["params"]
    assert int8["bytes_on_disk"] < pruned["bytes_on_disk"] / 2.5 < orig["bytes_on_disk"] / 2.5
    assert (out / "report.md").read_text().count("|") > 20 and (out / "finetune" / "metrics.jsonl").is_file()
    back = E.load_model(out / "int8.safetensors")
    assert sum(isinstance(mod, Q.dynamic_linear_class()) for mod in back.modules()) == 8  # q/k/v fused
    # --engine auto (the default) timed both x86 engines and packed for the faster one
    chosen = report["measurement"]["engine"]
    assert chosen in ("x86", "onednn") and back.quant_engine == chosen
    assert any(s.startswith("int8 engine: x86") and s.endswith(f"-> {chosen}") for s in report["steps"])
    assert report["measurement"]["allocator"].startswith("glibc")
    # user errors: one line, exit 2
    assert main(["compress", str(tmp_path / "nope"), "--quantize", "int8"]) == 2
    assert main(["compress", str(run), "--quantize", "int3"]) == 2
    assert main(["compress", str(run), "--quantize", "int8", "--engine", "avx"]) == 2
    assert main(["compress", str(run), "--prune", "0.5", "--prune-method", "nm", "--nm", "0:0"]) == 2
    assert main(["compress", str(run), "--quantize", "int8", "--lr", "nan"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "int3" in err and "--engine 'avx'" in err and err.count("\n") == 5
    assert "needs 0 < N < M, got 0:0" in err and "--lr nan must be" in err


def test_sharded_checkpoint_loads_from_dcp_folder(trained, tmp_path):
    """A checkpoint holding a torch.distributed.checkpoint folder instead of model.pt."""
    import torch.distributed.checkpoint as dcp

    from paratrain.model_compression.recipe import load_checkpoint

    run, cfg, model, _ = trained
    root = tmp_path / "run" / "checkpoints"
    tmp = ckpt.begin(root, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the layout of paratrain.parallel.dist_checkpoint: flat model.<name> and optim.<name>.<state>
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        state.update({f"optim.{k}.exp_avg": torch.zeros_like(v) for k, v in model.named_parameters()})
        dcp.save(state, checkpoint_id=str(tmp / "dcp"), no_dist=True)
    ckpt.save_file(tmp, "meta.json", {"step": 5})
    ckpt.commit(root, 5, keep=1)
    (tmp_path / "run" / "config.toml").write_text(cfg.to_toml())
    _, loaded, step_dir = load_checkpoint(tmp_path / "run")
    assert step_dir.name == "step_5" and not (step_dir / "model.pt").exists()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
