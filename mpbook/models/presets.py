"""Built-in presets: small random-weight models built from a config, so nothing is downloaded.

``tiny`` (0.2 M parameters, for the demo, the notebooks and the tests) and ``small`` (25 M,
for benchmarks where compute, not overhead, decides) are Llama-family models (grouped-query
attention, tied embeddings, RoPE) saved once to a folder with their tokenizer: a vocabulary
of English words with a chat template (:mod:`mpbook.models.tokenizer`), so that a random
model prints words and ``--chat`` works offline. ``llama-135m`` (135 M, SmolLM-135M's shape,
a byte-level BPE tokenizer trained here: :mod:`mpbook.models.bpe`) is what a real small model
costs, for the benchmarks against transformers' own path.
"""

from __future__ import annotations

import os
from pathlib import Path

from .tokenizer import TOKENIZER_IDS, generation_eos_ids, tiny_word_tokenizer

TINY = "tiny"
# Part of the cached folder's name: a change to the presets' files must not reuse old ones.
PRESET_VERSION = 2


def tiny_config():
    """The ``tiny`` preset: 6 layers, 8 query heads over 4 KV heads, a 394-token vocabulary.

    Sized so that tp in {1, 2, 4} and pp up to 6 all apply, and a forward pass takes
    milliseconds on a CPU.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        **TOKENIZER_IDS,
    )


def small_config():
    """The ``small`` preset: 8 layers of width 512, 8 query heads over 4 KV heads (25 M
    parameters): big enough that a CPU engine spends its time in matrix products."""
    config = tiny_config()
    config.update(dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, max_position_embeddings=1024))
    return config


def llama_135m_config():
    """The ``llama-135m`` preset: SmolLM-135M's shape (30 layers of width 576, 9 query heads
    over 3 KV heads, a 49,152-token byte-level BPE vocabulary, tied embeddings; 135 M
    parameters) with random weights: what a real small model costs, for the benchmarks.
    Its tokenizer is trained here (:mod:`mpbook.models.bpe`), nothing is downloaded."""
    from .bpe import VOCAB_SIZE

    config = tiny_config()
    config.update(dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, max_position_embeddings=2048, vocab_size=VOCAB_SIZE))
    return config


PRESETS = {"tiny": tiny_config, "small": small_config, "llama-135m": llama_135m_config}


def preset_tokenizer(name: str):
    """The tokenizer a preset is saved with: the word tokenizer, or for ``llama-135m`` a BPE one."""
    if name == "llama-135m":
        from .bpe import bpe_tokenizer

        return bpe_tokenizer()
    return tiny_tokenizer()


def tiny_tokenizer():
    """The presets' tokenizer (English words, a chat template); pads on the left."""
    return tiny_word_tokenizer()


def cache_dir() -> Path:
    return Path(os.environ.get("MPBOOK_CACHE", Path.home() / ".cache" / "mpbook"))


def build_tiny(folder: str | os.PathLike | None = None, *, seed: int = 0) -> Path:
    """Save the ``tiny`` preset (random weights from ``seed``) to ``folder``; return it."""
    return build_preset(TINY, folder, seed=seed)


def build_preset(name: str, folder: str | os.PathLike | None = None, *, seed: int = 0) -> Path:
    """Save a preset (random weights from ``seed``) to ``folder`` (default: the cache), once."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder) if folder is not None else cache_dir() / f"{name}-v{PRESET_VERSION}-seed{seed}"
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    save_random(PRESETS[name](), tmp, seed=seed, tokenizer=preset_tokenizer(name))
    # The two files that say "built" (above) go in last: another process building or reading
    # the same preset at the same moment (engines, test workers) never finds them beside a
    # folder that still lacks the tokenizer's files. Each file is replaced whole.
    for item in sorted(tmp.iterdir(), key=lambda item: item.name in ("config.json", "model.safetensors")):
        os.replace(item, folder / item.name)
    tmp.rmdir()
    return folder


def save_random(config, folder: str | os.PathLike, *, seed: int = 0, tokenizer=None) -> Path:
    """A random-weight model of ``config`` and ``tokenizer`` (default: the presets' word
    tokenizer), saved with save_pretrained
    (safetensors). Weights and biases are drawn wider than transformers' init (std 0.2 at
    width 64, shrinking as 1/sqrt(width)) so that greedy decoding wanders instead of
    repeating one token."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # A family without one width (its parts in sub-configs of their own) is drawn as width 64.
    width = getattr(config.get_text_config(), "hidden_size", None) or 64
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1 or name.endswith(".bias"):  # norms keep their ones
                param.normal_(0.0, 0.2 * (64 / width) ** 0.5)
    if config.vocab_size < TOKENIZER_IDS["vocab_size"]:
        raise ValueError(
            f"vocab_size={config.vocab_size}: the presets' tokenizer has {TOKENIZER_IDS['vocab_size']} tokens; "
            "build the config with **mpbook.models.presets.TOKENIZER_IDS"
        )
    # End of text or end of a chat turn, as chat models list both.
    model.generation_config.eos_token_id = generation_eos_ids()
    model.generation_config.pad_token_id = TOKENIZER_IDS["pad_token_id"]
    model.save_pretrained(folder)
    (tokenizer or tiny_tokenizer()).save_pretrained(folder)
    return Path(folder)




# Tiny random configs of other families, with the presets' tokenizer, each keeping what makes its family different: Gemma 2's
# sliding window and softcapping, Phi-3's fused qkv and gate_up, GPT-NeoX's fused per-head qkv,
# partial rotary and parallel residual, the MoE routers. Small enough that a forward pass takes
# milliseconds on one CPU core. Used by the tests and the benchmarks.
FAMILY_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, **TOKENIZER_IDS,
)
FAMILIES: dict[str, dict] = {
    # head_dim defaults to 256 in Gemma 2; a 4-token window so prompts overflow it. Untied: with
    # random weights a tied, sqrt(hidden)-scaled embedding repeats the last prompt token forever.
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=4, tie_word_embeddings=False),
    "phi3": dict(),
    "mixtral": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    # mlp_only_layers=[1]: one dense layer, so the plan's dense mlp rules are exercised too.
    "qwen3_moe": dict(moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                      mlp_only_layers=[1], head_dim=16),
    "gpt_neox": dict(num_key_value_heads=None),  # no GQA; partial rotary and parallel residual by default
    "olmo2": dict(),
    "granite": dict(embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0,
                    attention_multiplier=0.0625),
    "llama": dict(tie_word_embeddings=True),
    # No pp and no tp plan in transformers 5.24: pipeline by module order; tensor with a user plan.
    "gpt2": dict(num_key_value_heads=None, intermediate_size=None),
}


def family_config(model_type: str, **overrides):
    """A tiny random-weight config of ``model_type`` (one of :data:`FAMILIES`)."""
    from transformers import AutoConfig

    kwargs = {**FAMILY_COMMON, **FAMILIES[model_type], **overrides}
    return AutoConfig.for_model(model_type, **{k: v for k, v in kwargs.items() if v is not None})
