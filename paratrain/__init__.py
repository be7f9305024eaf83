"""paratrain: train large Transformers with data, parameter-server and model parallelism.

Python API (docs/python-api.md)::

    import paratrain
    cfg = paratrain.Config.load("run.toml", overrides=["--parallel.nproc=2"])
    result = paratrain.train(cfg, model=make_model, train_data=dataset)
"""

from typing import TYPE_CHECKING, Any

from paratrain.config import Config, ConfigError

if TYPE_CHECKING:
    from paratrain.api import RunResult, TrainingFailed, train

__all__ = ["Config", "ConfigError", "RunResult", "TrainingFailed", "train"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # the API pulls in torch: import it on first use, so `import paratrain` stays light
    if name in ("RunResult", "TrainingFailed", "train"):
        from paratrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'paratrain' has no attribute {name!r}")
