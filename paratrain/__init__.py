"""paratrain: train large Transformers with data, parameter-server and model parallelism."""

from paratrain.config import Config, ConfigError

__all__ = ["Config", "ConfigError"]
__version__ = "0.1.0"
