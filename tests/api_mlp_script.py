"""A user script for tests/test_api.py: its pieces live in __main__ (the spawn path must import it).

python tests/api_mlp_script.py RUN_DIR NPROC BATCH [bad|badsplit|ps]   -> prints the final loss, or one error line
(bad: a model that returns no loss, and no loss_fn; ps: parameter-server sync, e.g. under torchrun)
"""

import sys

import torch
from torch import nn

import paratrain


class Regression(torch.utils.data.Dataset):
    def __init__(self, n=256):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.sin(self.x.sum(1, keepdim=True) / 3)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Words(Regression):
    def __getitem__(self, i):
        return "not a tensor", self.y[i]


class NoLoss(nn.Module):
    """Returns predictions, not a loss: without a loss_fn that is a user error (found in the workers)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 1)

    def forward(self, x, y):
        return self.lin(x)


def make_model():
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP, built from nn.Linear (no dropout)."""

    def __init__(self, d=16):
        super().__init__()
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        att = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        x = x + self.proj(att.masked_fill(mask, float("-inf")).softmax(-1) @ v)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Embedding + a ModuleList of blocks + head: the foreign model for pp_split and meta init."""

    def __init__(self, vocab=24, d=16, n_layer=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_layer))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class Sequences(torch.utils.data.Dataset):
    """(ids, next ids) of a fixed pattern with noise: learnable, deterministic."""

    def __init__(self, n=256, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, 24, (n, 1), generator=g)
        self.ids = (start + 3 * torch.arange(9)) % 24

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i, :-1], self.ids[i, 1:]


def meta_tiny_lm():
    """TinyLM built on the meta device by the factory itself (for ZeRO-3: each rank fills its shards)."""
    with torch.device("meta"):
        return TinyLM()


def token_ce(model, batch):
    ids, targets = batch
    return nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())


def config(run_dir, nproc, batch):
    return paratrain.Config.load(overrides=[
        f'--run.dir="{run_dir}"', f"--parallel.nproc={nproc}", f"--data.batch_size={batch}", "--train.steps=10",
        "--train.log_every=1", "--train.eval_every=5", "--train.eval_batches=2", "--train.warmup_steps=2",
        "--train.threads=1", "--train.deterministic=true", "--train.lr=1e-2"])


if __name__ == "__main__":
    run_dir, nproc, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    bad = sys.argv[4:] == ["bad"]
    try:
        if sys.argv[4:] == ["badsplit"]:  # a split name the model does not have: found in the workers
            cfg = config(run_dir, nproc, batch)
            cfg.parallel.pp = 2
            paratrain.train(cfg, model=TinyLM, loss_fn=token_ce, train_data=Sequences(), pp_split=["blocks.9"])
        cfg = config(run_dir, nproc, batch)
        if sys.argv[4:] == ["ps"]:
            cfg.parallel.sync, cfg.ps.mode, cfg.ps.secret = "ps", "sync", "api-torchrun-secret-0123456789"
        result = paratrain.train(cfg, model=NoLoss if bad else make_model,
                                 loss_fn=None if bad else mse, train_data=Regression(), val_data=Regression(64))
    except paratrain.ConfigError as e:
        print(f"error: {e}")
        sys.exit(2)
    print(f"ok {result.final_loss}")
