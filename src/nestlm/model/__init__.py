from nestlm.model.config import BLOCK_KINDS, ConfigError, ModelConfig
from nestlm.model.decoder import Block, Cache, Decoder

__all__ = ["BLOCK_KINDS", "Block", "Cache", "ConfigError", "Decoder", "ModelConfig"]
