"""A Hugging Face transformers GPT-2 (tiny config, random init) trained by paratrain.training."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import paratrain
from tests.conftest import tiny_config

COMMON = ["--train.steps=10", "--train.log_every=1", "--train.deterministic=true", "--train.eval_every=5",
          "--checkpoint.every=5", "--checkpoint.keep=3"]


def make_gpt2():
    """Tiny GPT-2 over paratrain's byte tokenizer (261 ids); no dropout, so ranks match one process."""
    cfg = transformers.GPT2Config(vocab_size=261, n_positions=32, n_embd=32, n_layer=2, n_head=2, use_cache=False,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus):
    cfg = tiny_config(tmp_path_factory.mktemp("hf") / "single", corpus, *COMMON, "--parallel.nproc=1",
                      "--data.batch_size=4")
    return paratrain.train(cfg, model=make_gpt2)


def assert_same_losses(a: dict[int, float], b: dict[int, float], steps: range = range(1, 11)) -> None:
    assert sorted(b) == list(steps)
    for step in steps:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


def resume_in_one_process(result: paratrain.RunResult, run_dir, corpus) -> paratrain.RunResult:
    """Continue a 2-rank run from its step-5 checkpoint in this process (batch 4 = 2 ranks x 2)."""
    cfg = tiny_config(run_dir, corpus, *COMMON, "--parallel.nproc=1", "--data.batch_size=4",
                      f'--checkpoint.path="{result.checkpoint(5)}"')
    return paratrain.train(cfg, model=make_gpt2)


def test_ddp_matches_one_process_and_its_checkpoint_resumes(single, tmp_path, corpus):
    cfg = tiny_config(tmp_path / "ddp", corpus, *COMMON, "--parallel.nproc=2", "--data.batch_size=2")
    ddp = paratrain.train(cfg, model=make_gpt2)
    assert ddp.summary["strategy"] == "ddp" and ddp.summary["world_size"] == 2
    a = single.losses()
    assert a[10] < a[1] - 0.5  # it learns
    assert_same_losses(a, ddp.losses())
    assert abs(single.val_loss - ddp.val_loss) < 1e-5
    assert json.loads((ddp.checkpoint() / "meta.json").read_text())["arch"] == "custom"
    assert_same_losses(a, resume_in_one_process(ddp, tmp_path / "resumed", corpus).losses(), range(6, 11))

    # export: the full state dict in one safetensors file, tied weights once
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = ddp.export_safetensors(tmp_path / "gpt2.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        aliases = json.loads(f.metadata()["aliases"])
    assert aliases == {"lm_head.weight": "transformer.wte.weight"}
    tensors.update({alias: tensors[target] for alias, target in aliases.items()})
    exported, saved = make_gpt2(), make_gpt2()
    exported.load_state_dict(tensors)
    saved.load_state_dict(ddp.state_dict())
    x = torch.randint(0, 261, (2, 16))
    assert torch.equal(exported(input_ids=x).logits, saved(input_ids=x).logits)


def test_zero3_matches_one_process_and_its_checkpoint_resumes(single, tmp_path, corpus):
    cfg = tiny_config(tmp_path / "zero3", corpus, *COMMON, "--parallel.nproc=2", "--parallel.zero=3",
                      "--data.batch_size=2")
    z3 = paratrain.train(cfg, model=make_gpt2)
    assert z3.summary["world_size"] == 2 and (z3.checkpoint(5) / "dcp").is_dir()
    assert_same_losses(single.losses(), z3.losses())
    assert_same_losses(single.losses(), resume_in_one_process(z3, tmp_path / "resumed", corpus).losses(),
                       range(6, 11))
    make_gpt2().load_state_dict(z3.state_dict())  # the full state dict, gathered from the shards


class Tokens(torch.utils.data.Dataset):
    """Unshifted {"input_ids", "labels"} rows, as a Hugging Face data pipeline gives them."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = (torch.arange(16) * (i % 7 + 1)) % 250
        return {"input_ids": ids, "labels": ids}


def test_own_loss_on_user_data(tmp_path):
    cfg = tiny_config(tmp_path / "own", None, "--parallel.nproc=1", "--train.steps=8", "--data.batch_size=8",
                      "--train.eval_every=0", "--checkpoint.keep=0", "--train.lr=1e-2")
    result = paratrain.train(cfg, model=make_gpt2, train_data=Tokens(), val_data=Tokens())
    losses = result.losses()
    assert losses[8] < losses[1]  # out.loss, the model's own shifted loss, is what is trained
    assert result.val_loss is not None and result.summary["samples_per_s"] > 0
