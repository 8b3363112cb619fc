"""Where a model comes from: a hub id, a ``save_pretrained`` folder, or a preset.

Weights are read from safetensors only (never a pickle).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MpbookError
from .presets import PRESETS, build_preset


def resolve(model: str | os.PathLike, *, weights: bool = True) -> Path:
    """A local folder holding config.json and the weights for ``model`` (a hub id: its
    repository's safetensors, configs and tokenizer files; what the engines load).
    ``weights=False``: for a hub id, everything but the weights (config, generation config,
    tokenizer): what the client checks a run with before anything large is downloaded."""
    name = str(model)
    if name in PRESETS:
        return build_preset(name)
    local = _local_folder(name, f"--model {name}")
    if local is not None:
        return local
    patterns = ["*.json", "*.model", "*.txt"] + (["*.safetensors"] if weights else [])
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as exc:
        raise MpbookError(
            f"--model {name}: not a local folder, and the hub could not provide it ({type(exc).__name__}); "
            "download it where the hub is reachable and pass the folder, or use --model tiny"
        ) from None


def _local_folder(name: str, asked: str) -> Path | None:
    """``name`` as a save_pretrained folder; None when it can only be a hub id. ``asked``: the
    words that name it in an error."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MpbookError(f"{asked}: the folder has no config.json; point at a save_pretrained folder")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise MpbookError(
            f"{asked}: no such folder; give a save_pretrained folder, a hub id like "
            f"HuggingFaceTB/SmolLM2-360M, or 'tiny'"
        )
    return None


def load_config(model: str | os.PathLike, *, asked: str | None = None):
    """The transformers config of ``model``: a preset, a folder, or a hub id, of which only
    ``config.json`` is fetched (planning a 70 B model must not download its weights).
    ``asked``: the words that name the model in an error when a Python call asked for it
    (``plan('org/name')``); by default a magic's (``--model org/name``)."""
    from transformers import AutoConfig

    name = str(model)
    if name in PRESETS:
        return AutoConfig.from_pretrained(build_preset(name))
    local = _local_folder(name, asked or f"--model {name}")
    if local is not None:
        return AutoConfig.from_pretrained(local)
    try:
        return AutoConfig.from_pretrained(_hub_config(name).parent)
    except Exception as exc:
        if asked is None:
            fix = "download its config.json where the hub is reachable and pass the folder, or use --model tiny"
        else:  # a Python call: a config object needs no hub at all
            fix = ("give a config instead, which needs no network: transformers.AutoConfig.from_pretrained(FOLDER) "
                   "of a folder holding the model's config.json, or a config built by hand such as "
                   "transformers.LlamaConfig(num_hidden_layers=32, ...); or the preset 'tiny'")
        raise MpbookError(
            f"{asked or f'--model {name}'}: not a local folder, and the hub could not provide its config.json "
            f"({type(exc).__name__}); {fix}"
        ) from None


def _hub_config(name: str) -> Path:
    """A hub model's config.json, fetched alone (or the cache's copy when the hub is out of reach)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    try:
        # One request: hf_hub_download, when the hub cannot be reached and nothing is cached,
        # tries again and again for half a minute before it gives up.
        get_hf_file_metadata(hf_hub_url(name, "config.json"))
    except Exception as unreachable:  # offline, unknown, gated: the cache's copy, if any
        try:
            return Path(hf_hub_download(name, "config.json", local_files_only=True))
        except Exception:
            raise unreachable from None
    return Path(hf_hub_download(name, "config.json"))


def load_tokenizer(model: str | os.PathLike):
    """The model's tokenizer, padding on the left (generation appends on the right)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(model))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single or sharded checkpoint)."""
    import json

    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise MpbookError(
            f"{folder}: no model.safetensors; mpbook loads safetensors only (never pickled weights). "
            "Re-save the model with save_pretrained(safe_serialization=True)"
        )
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}




# A small instruct model for the examples: 16 query heads over 8 KV heads (tp in {1, 2, 4, 8}),
# 28 layers, a chat template; about 0.6 B parameters (1.2 GB in bfloat16).
EXAMPLE_MODEL = "Qwen/Qwen3-0.6B"


def suggested_model(timeout_s: float = 3.0) -> str:
    """The model the README's examples and the notebooks start with: :data:`EXAMPLE_MODEL`
    when it is in the local Hugging Face cache or the hub answers within ``timeout_s``, else
    the offline ``tiny`` preset (random weights: gibberish text, every mechanism real)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(EXAMPLE_MODEL, "config.json"), str):
            return EXAMPLE_MODEL
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            return "tiny"
        from huggingface_hub import HfApi

        HfApi().model_info(EXAMPLE_MODEL, timeout=timeout_s)
        return EXAMPLE_MODEL
    except Exception:  # no network, no hub: the preset
        return "tiny"
