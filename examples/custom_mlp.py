"""A plain nn.Module (an MLP) on synthetic regression, trained data-parallel by paratrain.

    python examples/custom_mlp.py                          # 2 local workers (DDP)
    python examples/custom_mlp.py --parallel.zero=2        # any --section.key=value override
    torchrun --nproc_per_node=2 examples/custom_mlp.py     # or as ranks of a torchrun job
"""

import sys

import torch
from torch import nn

import paratrain


def regression(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """n samples of y = sin(x . w / 4), x of 16 features (w is fixed; ``seed`` picks the x)."""
    w = torch.randn(16, 1, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.TensorDataset(x, torch.sin(x @ w / 4))


def make_model() -> nn.Module:  # a factory: every rank builds the same initial weights from run.seed
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))


def mse(model: nn.Module, batch) -> torch.Tensor:  # the mean loss over the batch
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


if __name__ == "__main__":
    cfg = paratrain.Config.load(overrides=["--run.dir=runs/custom-mlp", "--parallel.nproc=2", "--train.steps=200",
                                           "--data.batch_size=64", "--train.eval_every=50", "--run.overwrite=true",
                                           *sys.argv[1:]])  # a re-run starts over
    result = paratrain.train(cfg, model=make_model, loss_fn=mse, train_data=regression(4096, seed=0),
                             val_data=regression(512, seed=1))
    print(f"final loss {result.final_loss:.4f}, val loss {result.val_loss:.4f}, run dir {result.run_dir}")
