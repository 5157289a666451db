"""The hybrid decoder: config, SubArch (a nested submodel's widths), layout (the one slicing rule), the mixers,
the SSD scan, the Decoder, and extract (a submodel as a standalone Decoder)."""

from nestlm.errors import ConfigError
from nestlm.model.config import BLOCK_KINDS, ModelConfig
from nestlm.model.decoder import Block, Cache, Decoder
from nestlm.model.subarch import SubArch, sliced_config

__all__ = ["BLOCK_KINDS", "Block", "Cache", "ConfigError", "Decoder", "ModelConfig", "SubArch", "sliced_config"]
