"""nestlm: many-in-one elastic language models (Star Elastic / Nemotron Elastic)."""

from nestlm.arch import SubArch, count_active_params, count_memory, count_params, sliced_config
from nestlm.model import ConfigError, ModelConfig
from nestlm.model.decoder import Cache, Decoder

__version__ = "0.1.0"

__all__ = [
    "Cache", "ConfigError", "Decoder", "ModelConfig", "SubArch",
    "count_active_params", "count_memory", "count_params", "sliced_config",
]


def __getattr__(name):  # the converters import transformers: load them on first use
    if name in ("from_hf", "to_hf", "load_hf_state", "CheckpointError", "UnsupportedArchitecture"):
        from nestlm import convert

        return getattr(convert, name)
    raise AttributeError(name)
