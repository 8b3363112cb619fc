"""What the client knows of a model, resolved once per kernel: its folder, config, tokenizer
and end-of-sequence ids; a hub model's weights fetched only once a run on it has passed its checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ModelInfo:
    """What the client knows of a model, resolved once: its folder, config, tokenizer and
    end-of-sequence ids (the generation config's, else the model config's)."""

    name: str
    folder: Any
    config: Any
    tokenizer: Any
    eos_token_ids: tuple[int, ...] = ()
    weights_fetched: bool = False  # a hub model's weights are in the local cache

    @classmethod
    def load(cls, name: str) -> ModelInfo:
        """Everything but the weights: a hub model's weights are fetched once a run on it has
        passed every check (:meth:`fetch_weights`)."""
        from transformers import GenerationConfig

        from .. import models

        folder = models.resolve(name, weights=False)
        config = models.load_config(folder)
        try:
            eos = GenerationConfig.from_pretrained(folder).eos_token_id
        except OSError:  # no generation_config.json: the model config says
            eos = None
        if eos is None:
            eos = getattr(config, "eos_token_id", None)
        eos_ids = tuple([eos] if isinstance(eos, int) else list(eos or []))
        return cls(name, folder, config, models.load_tokenizer(folder), eos_ids)

    def fetch_weights(self) -> None:
        """Download a hub model's weights to the cache the engines load from (once)."""
        if not self.weights_fetched:
            from .. import models

            models.resolve(self.name)
            self.weights_fetched = True

    @property
    def from_hub(self) -> bool:
        """A hub id (its weights come from the hub's cache), not a preset or a local folder."""
        from pathlib import Path

        from ..models.presets import PRESETS

        return self.name not in PRESETS and not Path(self.name).expanduser().is_dir()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))
