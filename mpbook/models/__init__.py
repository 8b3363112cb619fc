"""Models: where they come from (``source``), the built-in ``presets``, what they are made of
and what each rank of a layout holds (``structure``, read from the model's own plans), and
loading that part (``loading``, ``checkpoint``), on a CPU onto huge pages (``huge_pages``) with
each Linear weight in the order a run's rows stream fastest (``weight_order``)."""

from .huge_pages import place_on_huge_pages
from .loading import Stage, load_stage, load_whole, whole_stage
from .presets import PRESETS, build_preset, build_tiny, save_random, small_config, tiny_config, tiny_tokenizer
from .source import EXAMPLE_MODEL, load_config, load_tokenizer, resolve, suggested_model
from .support import architecture_table, causal_lm_class, check_layout, supported_strategies
from .weight_order import order_weights, unpack_weights

__all__ = [
    "EXAMPLE_MODEL", "PRESETS", "Stage", "architecture_table", "build_preset", "build_tiny", "causal_lm_class",
    "check_layout",
    "load_config", "load_stage", "load_tokenizer", "load_whole", "order_weights", "place_on_huge_pages", "resolve", "save_random", "small_config",
    "unpack_weights",
    "suggested_model", "supported_strategies", "tiny_config", "tiny_tokenizer", "whole_stage",
]
