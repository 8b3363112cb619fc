"""Models: where a model comes from, and loading just the part a rank needs.

A model is named by a Hugging Face hub id, a local ``save_pretrained`` folder, or the
built-in preset ``tiny``: a random-weight Llama-family model (grouped-query attention,
tied embeddings, RoPE) with a byte-level tokenizer, built from a config and saved to a
folder once, so that the demo, the notebooks and the tests need no download.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MpbookError

TINY = "tiny"


def tiny_config():
    """The ``tiny`` preset: 6 layers, 8 query heads over 4 KV heads, 259-token vocabulary.

    Sized so that tp in {1, 2, 4} and pp up to 6 all apply, and a forward pass takes
    milliseconds on a CPU.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=256,
        bos_token_id=257,
        eos_token_id=258,
    )


def tiny_tokenizer():
    """Byte-level tokenizer: one token per byte plus <pad>, <s>, </s>; pads on the left."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def cache_dir() -> Path:
    return Path(os.environ.get("MPBOOK_CACHE", Path.home() / ".cache" / "mpbook"))


def build_tiny(folder: str | os.PathLike | None = None, *, seed: int = 0) -> Path:
    """Save the ``tiny`` preset (random weights from ``seed``) to ``folder``; return it."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder) if folder is not None else cache_dir() / f"tiny-seed{seed}"
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32)
    # Random init, scaled up a little so that greedy decoding does not collapse to one token.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)  # safetensors
    tiny_tokenizer().save_pretrained(tmp)
    for item in tmp.iterdir():
        os.replace(item, folder / item.name)
    tmp.rmdir()
    return folder


def resolve(model: str | os.PathLike) -> Path:
    """A local folder holding config.json (and weights) for ``model``."""
    name = str(model)
    if name == TINY:
        return build_tiny()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MpbookError(f"--model {name}: the folder has no config.json; point at a save_pretrained folder")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise MpbookError(
            f"--model {name}: no such folder; give a save_pretrained folder, a hub id like "
            f"HuggingFaceTB/SmolLM2-360M, or 'tiny'"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:
        raise MpbookError(
            f"--model {name}: not a local folder, and the hub could not provide it ({type(exc).__name__}); "
            "download it where the hub is reachable and pass the folder, or use --model tiny"
        ) from None


def load_config(model: str | os.PathLike):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve(model))
