"""nestlm: many-in-one elastic language models (Star Elastic / Nemotron Elastic)."""

from nestlm.arch import SubArch, count_active_params, count_memory, count_params, sliced_config
from nestlm.elastic.config import ElasticConfig
from nestlm.elastic.router import Router
from nestlm.elastic.train import elastify
from nestlm.errors import CheckpointError, ConfigError, UnsupportedArchitecture
from nestlm.model import ModelConfig
from nestlm.model.decoder import Cache, Decoder

__version__ = "0.1.0"

__all__ = [
    "Cache", "CheckpointError", "ConfigError", "Decoder", "ElasticConfig", "ModelConfig", "Router", "SubArch",
    "UnsupportedArchitecture", "count_active_params", "count_memory", "count_params", "elastify", "from_hf",
    "load_elastic", "load_hf_state", "sliced_config", "to_hf",
]


def __getattr__(name):  # loading and converting import transformers' configs: load them on first use
    if name in ("from_hf", "load_elastic"):
        from nestlm import load

        return getattr(load, name)
    if name in ("to_hf", "load_hf_state"):
        from nestlm import convert

        return getattr(convert, name)
    raise AttributeError(name)
