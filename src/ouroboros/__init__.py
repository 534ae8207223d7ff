"""ouroboros-decoding: lossless phrase-level speculative decoding for Hugging Face causal LMs."""

from .config import OuroborosConfig
from .generation import METHODS, GenerationOutput, GenerationStats, generate
from .pool import PhrasePool
from .runner import UnsupportedModelError
from .sizing import Sizing, load_config, tune

__all__ = ["METHODS", "GenerationOutput", "GenerationStats", "OuroborosConfig", "PhrasePool", "Sizing",
           "UnsupportedModelError", "generate", "load_config", "tune"]
__version__ = "0.1.0"
