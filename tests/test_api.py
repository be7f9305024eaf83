"""The Python API: paratrain.train with user models, losses and data; parity, sharding, errors."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import paratrain
from paratrain.config import ConfigError
from paratrain.data.user_data import DatasetBatches, IterableBatches, count_items, user_val_batches
from paratrain.training.handoff import save_injected
from paratrain.training.spec import RunSpec
from paratrain.training.user_model import MeanLoss, find_repeated_blocks, output_loss

SCRIPT = Path(__file__).with_name("api_mlp_script.py")
spec = importlib.util.spec_from_file_location("api_mlp_script", SCRIPT)
mlp = sys.modules["api_mlp_script"] = importlib.util.module_from_spec(spec)  # importable by workers too
spec.loader.exec_module(mlp)


def run_script(run_dir: Path, nproc: int, batch: int, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    return subprocess.run([sys.executable, str(SCRIPT), str(run_dir), str(nproc), str(batch), *extra],
                          capture_output=True, text=True, timeout=240, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with batch 16 (in this process) and DDP(2) with batch 8 started from a plain script."""
    root = tmp_path_factory.mktemp("api")
    single = paratrain.train(mlp.config(root / "single", 1, 16), model=mlp.make_model, loss_fn=mlp.mse,
                             train_data=mlp.Regression(), val_data=mlp.Regression(64))
    proc = run_script(root / "ddp", 2, 8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = paratrain.RunResult(root / "ddp", __import__("json").loads((root / "ddp" / "summary.json").read_text()))
    return single, ddp


@pytest.mark.slow
def test_ddp_from_a_script_matches_one_process(runs):
    single, ddp = runs
    a, b = single.losses(), ddp.losses()
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert a[10] < a[1]
    assert abs(single.val_loss - ddp.val_loss) < 1e-5
    s = ddp.summary
    assert s["strategy"] == "ddp" and s["world_size"] == 2 and s["samples_per_s"] > 0
    assert s["samples_per_s"] == pytest.approx(s["tokens_per_s"])  # no tokens here: a sample is the unit


@pytest.mark.slow
def test_checkpoint_state_dict_and_safetensors_export(runs, tmp_path):
    from safetensors.torch import load_file

    _, ddp = runs
    model = mlp.make_model()
    model.load_state_dict(ddp.state_dict())
    out = ddp.export_safetensors(tmp_path / "mlp.safetensors")
    loaded = load_file(str(out))
    assert set(loaded) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v)


@pytest.mark.slow
def test_ps_sync_matches_one_process(runs, tmp_path):
    single, _ = runs
    cfg = mlp.config(tmp_path / "ps", 2, 8)
    cfg.parallel.sync, cfg.ps.mode = "ps", "sync"
    ps = paratrain.train(cfg, model=mlp.make_model, loss_fn=mlp.mse, train_data=mlp.Regression())
    a, b = single.losses(), ps.losses()
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


@pytest.mark.slow
def test_ps_under_torchrun_matches_one_process(runs, tmp_path):
    """paratrain.train with sync = "ps" under torchrun: rank 0 serves, ranks 1-2 train (as workers 0-1)."""
    single, _ = runs
    run_dir = tmp_path / "ps-torchrun"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", "--rdzv_backend=c10d",
           "--rdzv_endpoint=127.0.0.1:0", str(SCRIPT), str(run_dir), "2", "8", "ps"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == 3  # the server and both workers return a result
    s = paratrain.RunResult(run_dir, __import__("json").loads((run_dir / "summary.json").read_text()))
    assert s.summary["strategy"] == "ps-sync" and s.summary["world_size"] == 2
    a, b = single.losses(), s.losses()
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


@pytest.mark.slow
def test_worker_errors_come_back_as_one_line(tmp_path):
    proc = run_script(tmp_path / "bad", 2, 8, "bad")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]  # a model defined in the script's __main__, found in the workers
    assert line.startswith("error: the model returned a tensor of shape (8, 1) and no loss: pass paratrain.train")
    proc = run_script(tmp_path / "badsplit", 2, 8, "badsplit")  # a factory: its split names are checked by the workers
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == (
        "error: pp_split name 'blocks.9' is not a submodule of TinyLM (e.g. emb, blocks.0, blocks.1, blocks.2)")


# ---- pipeline parallel and a meta-device build of a model of your own (2 workers each) --------------
def lm_config(run_dir, nproc, batch, **parallel):
    cfg = mlp.config(run_dir, nproc, batch)
    cfg.checkpoint.every = 5
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def train_lm(cfg, model=mlp.TinyLM, **kw):
    return paratrain.train(cfg, model=model, loss_fn=mlp.token_ce, train_data=mlp.Sequences(),
                           val_data=mlp.Sequences(64, seed=1), **kw)


@pytest.fixture(scope="module")
def lm_single(tmp_path_factory):
    """TinyLM in this process, batch 8: the reference for pp = 2 (batch 8) and ZeRO-3 (2 x 4)."""
    return train_lm(lm_config(tmp_path_factory.mktemp("lm") / "single", 1, 8))


def assert_same(a: dict[int, float], b: dict[int, float], steps=range(1, 11)) -> float:
    assert sorted(b) == list(steps)
    worst = max(abs(a[s] - b[s]) for s in steps)
    assert worst < 1e-5, (a, b)
    return worst


def resume_lm(result, run_dir):
    """Continue a 2-worker run from its step-5 checkpoint in this process (layout-independent DCP)."""
    cfg = lm_config(run_dir, 1, 8)
    cfg.checkpoint.path = str(result.checkpoint(5))
    return train_lm(cfg)


@pytest.mark.slow
def test_pp_split_matches_one_process_and_resumes(lm_single, tmp_path):
    pp = train_lm(lm_config(tmp_path / "pp", 2, 8, pp=2), pp_split=["blocks.2"])
    s = pp.summary
    assert s["strategy"] == "pp2-1f1b" and s["pipeline"]["stages"] == 2 and s["pipeline"]["microbatches"] == 2
    a = lm_single.losses()
    assert a[10] < a[1] - 1.0  # it learns
    assert_same(a, pp.losses())
    assert abs(lm_single.val_loss - pp.val_loss) < 1e-5
    model = mlp.TinyLM()
    model.load_state_dict(pp.state_dict())  # both stages' weights under the single-device names
    assert_same(a, resume_lm(pp, tmp_path / "resumed").losses(), range(6, 11))


@pytest.mark.slow
def test_meta_device_factory_under_zero3_matches_one_process_and_resumes(lm_single, tmp_path):
    z3 = train_lm(lm_config(tmp_path / "z3", 2, 4, zero=3), model=mlp.meta_tiny_lm)
    assert z3.summary["strategy"] == "fsdp" and (z3.checkpoint(5) / "dcp").is_dir()
    assert_same(lm_single.losses(), z3.losses())  # the same initial weights as a normal build from run.seed
    assert_same(lm_single.losses(), resume_lm(z3, tmp_path / "resumed").losses(), range(6, 11))


def test_params_on_meta_keeps_buffers_real():
    from paratrain.parallel.meta_init import build_on_meta, has_meta

    class WithMask(mlp.TinyLM):
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", torch.ones(4, 4).tril())

    m = build_on_meta(WithMask)
    assert all(p.is_meta for p in m.parameters()) and has_meta(m)
    assert not m.mask.is_meta and m.mask.sum() == 10
    assert not nn.Linear(2, 2).weight.is_meta  # the patch is gone afterwards


class NoLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 1)

    def forward(self, x, y):
        return self.lin(x)


def nested_factory():
    def make():
        return nn.Linear(8, 1)
    return make


def batches():
    yield torch.zeros(2, 8)


def test_user_errors_are_clear(tmp_path):
    cfg = mlp.config(tmp_path / "e", 2, 8)
    for piece, words in [
        ({"model": lambda: nn.Linear(8, 1)}, "model cannot be sent to 2 worker processes"),
        ({"model": nested_factory()}, "module-level function or class"),
        ({"model": mlp.make_model, "train_data": batches()}, "train_data cannot be sent"),
        ({"model": mlp.make_model, "loss_fn": lambda m, b: 0}, "loss_fn cannot be sent"),
    ]:
        with pytest.raises(ConfigError, match=words) as e:
            paratrain.train(cfg, **piece)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"train_data gave batch 0 with a str at batch\[0\]\[0\]; a batch must be"):
        paratrain.train(cfg, model=mlp.make_model, loss_fn=mlp.mse, train_data=mlp.Words())
    cfg.parallel.tp = 2
    with pytest.raises(ConfigError, match="parallel.tp = 2 needs a tensor-parallel plan for NoLoss"):
        paratrain.train(cfg, model=NoLoss, train_data=mlp.Regression())
    cfg.parallel.tp, cfg.parallel.pp = 1, 2  # model.tie_embeddings is paratrain's GPT's, not checked here
    for split, words in [(["blocks.9"], r"pp_split name 'blocks.9' is not a submodule of TinyLM \(e.g. emb, "),
                         (["blocks.1", "blocks.2"], "pp_split has 2 names but 2 pipeline stages need 1"),
                         (None, "parallel.pp = 2 needs split points for TinyLM")]:
        with pytest.raises(ConfigError, match=words) as e:
            paratrain.train(cfg, model=mlp.TinyLM(), loss_fn=mlp.token_ce, train_data=mlp.Sequences(),
                            pp_split=split)
        assert "\n" not in str(e.value)
    cfg.parallel.tp, cfg.parallel.nproc = 2, 4
    with pytest.raises(ConfigError, match="tp > 1 with pp > 1 is not supported for TinyLM"):
        paratrain.train(cfg, model=mlp.TinyLM, train_data=mlp.Sequences(), pp_split=["blocks.2"], tp_plan={"x": 1})
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.nproc, cfg.parallel.meta_init = 1, 1, 2, True
    with pytest.raises(ConfigError, match="meta_init = true .* set parallel.zero = 3"):
        paratrain.train(cfg, model=mlp.TinyLM, train_data=mlp.Sequences())
    assert not (tmp_path / "e").exists()  # nothing was started
    one = mlp.config(tmp_path / "one", 1, 8)
    with pytest.raises(ConfigError, match="returned a tensor of shape .* and no loss: pass paratrain.train"):
        paratrain.train(one, model=NoLoss, train_data=mlp.Regression())
    with pytest.raises(ConfigError, match="must return a scalar float tensor"):
        paratrain.train(one, model=mlp.make_model, loss_fn=lambda m, b: m(b[0]), train_data=mlp.Regression())
    with pytest.raises(ConfigError, match="train_data is a str"):
        paratrain.train(one, model=mlp.make_model, train_data="data.txt")
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        paratrain.train(one, model=mlp.make_model, loss_fn=mlp.mse, train_data=mlp.Regression(4))
    with pytest.raises(ConfigError, match="interactive session"):
        main = sys.modules["__main__"]
        saved = main.__dict__.pop("__file__", None), main.__spec__
        try:
            main.__spec__ = None
            NoLoss.__module__ = "__main__"
            main.NoLoss = NoLoss
            save_injected(tmp_path, {"model": NoLoss}, 2)
        finally:
            NoLoss.__module__ = __name__
            del main.NoLoss
            main.__spec__ = saved[1]
            if saved[0] is not None:
                main.__file__ = saved[0]


def test_under_torchrun_runs_as_that_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    result = paratrain.train(mlp.config(tmp_path / "tr", 2, 8), model=mlp.make_model(), loss_fn=mlp.mse,
                             train_data=[(torch.randn(4, 8), torch.randn(4, 1))] * 3)
    assert result.ok and result.summary["world_size"] == 1 and result.summary["steps"] == 10


# ---- data adapters and model helpers (no processes) ------------------------------------------------
def test_iterable_batches_shard_by_groups_and_resume():
    data = [torch.full((2, 1), float(i)) for i in range(7)]
    r0, r1 = IterableBatches(data, 0, 2), IterableBatches(data, 1, 2)
    got0 = [int(next(r0)[0]) for _ in range(4)]
    got1 = [int(next(r1)[0]) for _ in range(4)]
    assert got0 == [0, 2, 4, 0] and got1 == [1, 3, 5, 1]  # the 7th batch (an incomplete group) is dropped
    state = r0.state_dict()
    again = IterableBatches(data, 0, 2)
    again.load_state_dict(state)
    assert [int(next(again)[0]) for _ in range(3)] == [int(next(r0)[0]) for _ in range(3)]
    once = IterableBatches(iter(data[:4]), 0, 2)
    next(once), next(once)
    with pytest.raises(ConfigError, match="ran out after 4 batches"):
        next(once)


class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"x": [i, i + 1]}

    @staticmethod
    def collate_fn(items):
        return {"x": torch.tensor([it["x"] for it in items]), "labels": torch.tensor([[1, -100]] * len(items))}


def test_dataset_batches_use_the_dataset_collate_fn_and_the_sampler():
    b0, b1 = DatasetBatches(Pairs(), 2, 0, 2, seed=3), DatasetBatches(Pairs(), 2, 1, 2, seed=3)
    one = DatasetBatches(Pairs(), 4, 0, 1, seed=3)
    x0, x1, x = next(b0)["x"], next(b1)["x"], next(one)["x"]
    assert torch.equal(torch.cat([x0, x1]), x)  # two ranks of B = one process of 2B
    assert count_items(next(b0)) == 2  # labelled tokens, -100 excluded
    val = user_val_batches(Pairs(), 4, 1, 2)
    assert [v["x"][:, 0].tolist() for v in val] == [[4, 5, 6, 7]]


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])

    def forward(self, x):
        for b in self.blocks:
            x = b(self.embed(x) if x.shape[-1] == 4 else x)
        return self.heads[0](x).mean()


def test_find_repeated_blocks_and_plans():
    m = Tower()
    assert find_repeated_blocks(m) == list(m.blocks)  # the largest list of same-class modules
    assert find_repeated_blocks(m, "heads") == list(m.heads)
    assert len(find_repeated_blocks(m, "Linear")) == 6
    with pytest.raises(ConfigError, match="fsdp_block = 'Nope'"):
        find_repeated_blocks(m, "Nope")
    cfg = paratrain.Config.default()
    data = [torch.randn(5, 4)]
    spec = RunSpec.from_user(cfg, model=Tower, train_data=data)
    built = spec.build_model()
    assert spec.blocks(built) == list(built.blocks) and spec.arch == "custom" and spec.tp_plan is None
    assert not hasattr(built, "layer_modules")  # nothing is patched onto the user's module
    cfg.parallel.tp = 2
    with pytest.raises(ConfigError, match="parallel.tp = 2 needs a tensor-parallel plan for Tower"):
        RunSpec.from_user(cfg, model=Tower, train_data=data).build_model()
    cfg.parallel.tp, cfg.parallel.pp, cfg.model.tie_embeddings = 1, 2, False
    with pytest.raises(ConfigError, match="pp_split"):
        RunSpec.from_user(cfg, model=Tower, train_data=data).build_model()
    loss = MeanLoss(output_loss, "x")(m, torch.randn(5, 4))
    assert loss.dim() == 0  # the model's scalar output, weighted by 5 samples
