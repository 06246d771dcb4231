"""jaxft: fine-tune pretrained decoder LLMs in JAX."""

from jaxft.errors import JaxftError
from jaxft.formats.hf import load_pretrained, load_tokenizer
from jaxft.models import Decoder, DecoderConfig

__all__ = ["Decoder", "DecoderConfig", "JaxftError", "load_pretrained", "load_tokenizer"]
