"""The hybrid decoder. `nestlm.model.config` has no dependencies, so `nestlm.arch` can import it while the
decoder (which needs `nestlm.arch`) is loaded on first use."""

from nestlm.model.config import BLOCK_KINDS, ConfigError, ModelConfig

__all__ = ["BLOCK_KINDS", "Block", "Cache", "ConfigError", "Decoder", "ModelConfig"]


def __getattr__(name):
    if name in ("Block", "Cache", "Decoder"):
        from nestlm.model import decoder

        return getattr(decoder, name)
    raise AttributeError(name)
