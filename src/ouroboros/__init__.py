"""ouroboros-decoding: phrase-level speculative decoding for Hugging Face causal LMs, whose output is
the target's own (exact in float32)."""

from .config import OuroborosConfig
from .engine import Engine
from .errors import (
           ConfigError,
           InvalidArgumentError,
           OuroborosError,
           UnsupportedModelError,
)
from .generation import GenerationOutput, GenerationStats, generate
from .methods import METHODS, Method, register
from .pool import PhrasePool
from .sizing import Sizing, load_config, tune

__all__ = ["METHODS", "ConfigError", "Engine", "GenerationOutput", "GenerationStats", "InvalidArgumentError", "Method",
           "OuroborosConfig", "OuroborosError", "PhrasePool", "Sizing", "UnsupportedModelError", "generate",
           "load_config", "register", "tune"]
__version__ = "0.1.0"
