"""jaxft: fine-tune pretrained decoder LLMs in JAX.

Importing the package imports nothing else (config and data parsing stay free of jax); the pieces live in
their modules: `jaxft.formats.hf.load_pretrained`, `jaxft.config.load_config`, `jaxft.generate.generate`, ...
(docs/architecture.md has the map).
"""

from jaxft.errors import JaxftError

__all__ = ["JaxftError"]
