"""A user script for tests/test_api.py: its pieces live in __main__ (the spawn path must import it).

python tests/api_mlp_script.py RUN_DIR NPROC BATCH [bad]   -> prints the final loss, or one error line
(bad: a model that returns no loss, and no loss_fn)
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


def config(run_dir, nproc, batch):
    return paratrain.Config.load(overrides=[
        f'--run.dir="{run_dir}"', f"--parallel.nproc={nproc}", f"--data.batch_size={batch}", "--train.steps=10",
        "--train.log_every=1", "--train.eval_every=5", "--train.eval_batches=2", "--train.warmup_steps=2",
        "--train.threads=1", "--train.deterministic=true", "--train.lr=1e-2"])


if __name__ == "__main__":
    run_dir, nproc, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    bad = sys.argv[4:] == ["bad"]
    try:
        result = paratrain.train(config(run_dir, nproc, batch), model=NoLoss if bad else make_model,
                                 loss_fn=None if bad else mse, train_data=Regression(), val_data=Regression(64))
    except paratrain.ConfigError as e:
        print(f"error: {e}")
        sys.exit(2)
    print(f"ok {result.final_loss}")
