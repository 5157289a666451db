"""nestlm: many-in-one elastic language models (Star Elastic / Nemotron Elastic)."""

# `from nestlm.elastify import elastify` binds nestlm.elastify to the function, not to the submodule of the
# same name (a later `import nestlm.elastify` finds the module in sys.modules and keeps this binding)
from nestlm.arch import SubArch, count_active_params, count_memory, count_params, sliced_config
from nestlm.config import ElasticConfig
from nestlm.elastify import elastify, load_elastic
from nestlm.errors import ConfigError
from nestlm.model import ModelConfig
from nestlm.model.decoder import Cache, Decoder
from nestlm.router import Router

__version__ = "0.1.0"

__all__ = [
    "Cache", "ConfigError", "Decoder", "ElasticConfig", "ModelConfig", "Router", "SubArch",
    "count_active_params", "count_memory", "count_params", "elastify", "load_elastic", "sliced_config",
]


def __getattr__(name):  # the converters import transformers: load them on first use
    if name in ("from_hf", "to_hf", "load_hf_state", "CheckpointError", "UnsupportedArchitecture"):
        from nestlm import convert

        return getattr(convert, name)
    raise AttributeError(name)
