from jaxft.models.config import DecoderConfig, RopeConfig
from jaxft.models.decoder import Decoder

__all__ = ["Decoder", "DecoderConfig", "RopeConfig"]
