"""Hugging Face checkpoints in and out: logits equal transformers' own, import -> export ->
from_pretrained round trips, sharded checkpoints, refused mismatches, and training from an imported
checkpoint under DDP and tensor parallel."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers

import paratrain
from paratrain import checkpoint as ckpt
from paratrain import cli
from paratrain.config import Config, ConfigError
from paratrain.convert.import_hf import import_hf
from paratrain.data import build_data
from paratrain.hf import load_hf_weights
from paratrain.models import build_model
from tests.conftest import tiny_config
from tests.test_data_formats import hf_tokenizer_file

VOCAB = 261  # paratrain's byte tokenizer, so the models train on the test corpus as they are


def gpt2(tmp_path, name="gpt2", **kw):
    """A tiny random GPT-2 (exact GELU) saved to ``tmp_path / name``; returns (dir, model)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=None, eos_token_id=None, **kw)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path / name, **({"max_shard_size": "20KB"} if name.endswith("sharded") else {}))
    return tmp_path / name, model


def llama(tmp_path, name="llama", tie=False):
    """A tiny random Llama with grouped-query attention saved to ``tmp_path / name``."""
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                                   bos_token_id=None, eos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, model


def paratrain_model(hf_dir):
    """paratrain's model with the imported config and weights (through a real checkpoint on disk)."""
    run = hf_dir.parent / f"{hf_dir.name}-run"
    final = import_hf(hf_dir, run)
    cfg = Config.load(run / "config.toml")
    model = build_model(cfg.model, cfg.model.vocab_size, 0).eval()
    model.load_state_dict(ckpt.load_file(final, "model.pt"))
    return model, run


def assert_same_logits(ours, theirs, atol=1e-5):
    x = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (ours(x) - theirs(input_ids=x).logits).abs().max().item()
    assert diff < atol, diff


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logits_match_and_round_trip(tmp_path, family, capsys):
    hf_dir, hf_model = (gpt2 if family == "gpt2" else llama)(tmp_path)
    hf_tokenizer_file(hf_dir, ["some text to learn merges from </s>"] * 20)
    ours, run = paratrain_model(hf_dir)
    assert Config.load(run / "config.toml").data.tokenizer == f"hf:{(hf_dir / 'tokenizer.json').resolve()}"
    assert_same_logits(ours, hf_model)
    assert cli.main(["export-hf", str(run), "--out", str(tmp_path / "out")]) == 0
    assert "exported" in capsys.readouterr().out
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (tmp_path / "out" / "tokenizer.json").is_file() and exported["eos_token_id"] == 2
    again, info = type(hf_model).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for (name, a), (_, b) in zip(sorted(hf_model.state_dict().items()), sorted(again.state_dict().items()),
                                 strict=True):
        assert torch.equal(a, b), name
    assert_same_logits(ours, again.eval())


def test_tied_llama_and_gpt2_old_names(tmp_path):
    hf_dir, hf_model = llama(tmp_path, "tied", tie=True)
    ours, _ = paratrain_model(hf_dir)
    assert ours.lm_head.weight is ours.tok_emb.weight
    assert_same_logits(ours, hf_model)
    # original GPT-2 checkpoints have no "transformer." prefix and keep the causal-mask buffers
    from safetensors.torch import load_file, save_file

    hf_dir, hf_model = gpt2(tmp_path, "old")
    state = load_file(str(hf_dir / "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in state.items()}
    old["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    save_file(old, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    assert_same_logits(paratrain_model(hf_dir)[0], hf_model)


def test_sharded_checkpoint_is_read_one_shard_at_a_time(tmp_path, monkeypatch):
    import safetensors

    hf_dir, hf_model = gpt2(tmp_path, "gpt2-sharded")
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    real, open_now, most = safetensors.safe_open, [0], [0]

    class Counted:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            open_now[0] += 1
            most[0] = max(most[0], open_now[0])
            return self.f.__enter__()

        def __exit__(self, *exc):
            open_now[0] -= 1
            return self.f.__exit__(*exc)

    monkeypatch.setattr(safetensors, "safe_open", Counted)
    ours, _ = paratrain_model(hf_dir)
    assert most == [1] and open_now == [0]
    assert_same_logits(ours, hf_model)


def test_mismatched_configs_are_refused_in_one_line(tmp_path, capsys):
    hf_dir, _ = gpt2(tmp_path)
    base = {"arch": "gpt", "n_layer": 2, "n_head": 4, "d_model": 32, "d_ff": 128, "max_seq_len": 64,
            "init_from": f"hf:{hf_dir}"}
    for key, value in (("n_layer", 3), ("d_model", 64), ("n_head", 2), ("vocab_size", 300)):
        with pytest.raises(ConfigError, match=rf"^HF checkpoint .* has {key} = \S+ but the model has {key} = ") as e:
            model_config({**base, key: value})
        assert "\n" not in str(e.value)
    cfg = model_config(base)
    model = build_model(cfg.model, 270, 0)  # vocabulary from the data: checked when loading
    with pytest.raises(ConfigError, match="has vocab_size = 261 but the model has vocab_size = 270"):
        load_hf_weights(model, cfg.model, hf_dir)
    weights = (hf_dir / "model.safetensors").read_bytes()
    for broken in (weights[:len(weights) // 2], b"\xff" * 8 + weights[8:]):  # cut short; a wrong header size
        (hf_dir / "model.safetensors").write_bytes(broken)
        with pytest.raises(ConfigError, match=r"model.safetensors is not a readable safetensors file \("):
            load_hf_weights(build_model(cfg.model, 261, 0), cfg.model, hf_dir)
    (hf_dir / "model.safetensors").write_bytes(weights)
    with pytest.raises(ConfigError, match="is a gpt2 model .* set model.arch = 'gpt'"):
        model_config({**base, "arch": "bert"})
    with pytest.raises(ConfigError, match="has no config.json"):
        model_config({**base, "init_from": f"hf:{tmp_path}"})
    with pytest.raises(ConfigError, match="must be 'hf:DIR'"):
        model_config({**base, "init_from": str(hf_dir)})
    capsys.readouterr()
    assert cli.main(["import-hf", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["train", f'--model.init_from="hf:{hf_dir}"', "--model.n_layer=3", "--model.n_head=4",
                     "--model.d_model=32", "--model.max_seq_len=64", "--data.seq_len=32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has n_layer = 2 but the model has n_layer = 3" in err
    l_dir, _ = llama(tmp_path)
    lbase = {"arch": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32, "d_ff": 48,
             "rope_theta": 5000.0, "norm_eps": 1e-5, "tie_embeddings": False, "init_from": f"hf:{l_dir}"}
    model_config(lbase)
    with pytest.raises(ConfigError, match="has n_kv_head = 2 but the model has n_kv_head = 4"):
        model_config({**lbase, "n_kv_head": 4})


def model_config(model: dict):
    return Config.from_dict({"model": model, "data": {"seq_len": 32}})


def first_batch_loss(hf_model, cfg):
    """transformers' mean loss on the first global batch paratrain trains on."""
    batch = next(build_data(cfg, 0, 1).train)
    with torch.no_grad():
        logits = hf_model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item()


def test_training_from_imported_checkpoints(tmp_path, corpus):
    """One launch per layout: the first loss is transformers' loss on that batch (the weights were
    loaded), the loss then falls, and the exported result loads back into transformers."""
    g_dir, g_model = gpt2(tmp_path)
    l_dir, l_model = llama(tmp_path)
    common = ["--train.steps=20", "--train.lr=3e-3", "--data.seq_len=32", "--checkpoint.keep=1",
              "--model.max_seq_len=64", "--train.deterministic=true"]
    gpt_keys = [f'--model.init_from="hf:{g_dir}"', "--model.n_layer=2", "--model.n_head=4", "--model.d_model=32",
                "--model.d_ff=128"]
    llama_keys = [f'--model.init_from="hf:{l_dir}"', "--model.arch=llama", "--model.n_layer=2", "--model.n_head=4",
                  "--model.n_kv_head=2", "--model.d_model=32", "--model.d_ff=48", "--model.rope_theta=5000.0",
                  "--model.norm_eps=1e-5", "--model.tie_embeddings=false"]
    for name, keys, hf_model, layout, dp in (("gpt-ddp", gpt_keys, g_model, ["--parallel.nproc=2"], 2),
                                             ("llama-tp", llama_keys, l_model, ["--parallel.nproc=2",
                                                                                "--parallel.tp=2"], 1)):
        cfg = tiny_config(tmp_path / name, corpus, *common, *keys, *layout, "--data.batch_size=2")
        one = tiny_config(tmp_path / name, corpus, *common, *keys, "--parallel.nproc=1", f"--data.batch_size={2 * dp}")
        result = paratrain.train(cfg)
        losses = result.losses()
        assert abs(losses[1] - first_batch_loss(hf_model, one)) < 1e-4, (name, losses[1])
        assert losses[20] < losses[1] - 0.5, (name, losses)
        out = tmp_path / f"{name}-hf"
        assert cli.main(["export-hf", str(result.run_dir), "--out", str(out)]) == 0
        _, info = type(hf_model).from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
