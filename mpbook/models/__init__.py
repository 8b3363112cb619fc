"""Models: where they come from (``source``), the built-in ``presets``, and loading the part
of one that a rank needs (``loading``)."""

from .loading import load_stage, load_whole, supported_strategies
from .presets import PRESETS, build_preset, build_tiny, save_random, small_config, tiny_config, tiny_tokenizer
from .source import EXAMPLE_MODEL, load_config, load_tokenizer, resolve, suggested_model

__all__ = [
    "PRESETS", "build_preset", "build_tiny", "load_config", "load_stage", "load_tokenizer", "load_whole",
    "resolve", "save_random", "small_config", "suggested_model", "supported_strategies", "tiny_config", "tiny_tokenizer",
    "EXAMPLE_MODEL",
]
