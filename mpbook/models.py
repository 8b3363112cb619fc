"""Models: where a model comes from, and loading just the part a rank needs.

A model is named by a Hugging Face hub id, a local ``save_pretrained`` folder, or a
built-in preset: ``tiny`` (0.2 M parameters, for the demo, the notebooks and the tests) or
``small`` (25 M, for benchmarks where compute, not overhead, decides). Both are random-weight
Llama-family models (grouped-query attention, tied embeddings, RoPE) with a byte-level
tokenizer, built from a config and saved to a folder once, so that nothing is downloaded.
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


def small_config():
    """The ``small`` preset: 8 layers of width 512, 8 query heads over 4 KV heads (25 M
    parameters): big enough that a CPU engine spends its time in matrix products."""
    config = tiny_config()
    config.update(dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, max_position_embeddings=1024))
    return config


PRESETS = {"tiny": tiny_config, "small": small_config}


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
    return build_preset(TINY, folder, seed=seed)


def build_preset(name: str, folder: str | os.PathLike | None = None, *, seed: int = 0) -> Path:
    """Save a preset (random weights from ``seed``) to ``folder`` (default: the cache), once."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder) if folder is not None else cache_dir() / f"{name}-seed{seed}"
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    save_random(PRESETS[name](), tmp, seed=seed)
    for item in tmp.iterdir():
        os.replace(item, folder / item.name)
    tmp.rmdir()
    return folder


def save_random(config, folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """A random-weight model of ``config`` and the tiny tokenizer, saved with save_pretrained
    (safetensors). Weights and biases are drawn wider than transformers' init (std 0.2 at
    width 64, shrinking as 1/sqrt(width)) so that greedy decoding wanders instead of
    repeating one token."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1 or name.endswith(".bias"):  # norms keep their ones
                param.normal_(0.0, 0.2 * (64 / config.hidden_size) ** 0.5)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return Path(folder)


def resolve(model: str | os.PathLike) -> Path:
    """A local folder holding config.json (and weights) for ``model``."""
    name = str(model)
    if name in PRESETS:
        return build_preset(name)
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


def load_tokenizer(model: str | os.PathLike):
    """The model's tokenizer, padding on the left (generation appends on the right)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(model))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


SUPPORTED_ARCHITECTURES = {
    # model_type -> strategies that work with it. Llama-family models share the module
    # layout the stage and tensor-parallel code rely on: model.embed_tokens, model.layers
    # (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj), model.norm, model.rotary_emb, lm_head.
    "llama": ("data", "pipeline", "tensor"),
    "mistral": ("data", "pipeline", "tensor"),
    "qwen2": ("data", "pipeline", "tensor"),
    "qwen3": ("data", "pipeline", "tensor"),
}


def supported_strategies(config) -> tuple[str, ...]:
    """Every causal LM works with data parallel; Llama-family ones with all three."""
    return SUPPORTED_ARCHITECTURES.get(config.model_type, ("data",))


def _checkpoint_files(folder: Path) -> dict[str, Path]:
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


def load_whole(model: str | os.PathLike, *, dtype, device):
    """The whole model, from safetensors only (for architectures run data parallel)."""
    from transformers import AutoModelForCausalLM

    folder = resolve(model)
    _checkpoint_files(folder)  # a clear error when there is no safetensors checkpoint
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, attn_implementation="sdpa")
    return lm.to(device).eval().requires_grad_(False)


def load_stage(
    model: str | os.PathLike, *, layers: range, first: bool, last: bool, dtype, device, tp_rank: int = 0, tp: int = 1
):
    """Build the causal LM holding only ``layers`` (plus the embedding if ``first``, the final
    norm and LM head if ``last``) and read just those tensors from the safetensors files;
    with ``tp`` > 1, just this rank's slice of each projection that LAYER_PLAN splits.

    The stage's layers are renumbered from 0 (with a config that says so), so the stage's
    own KV cache and causal mask see exactly the layers it holds. With every layer, the
    first and the last stage at once, this is the whole model.
    """
    from .parallel.tensor import LAYER_PLAN, shard_linear
    import copy

    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = resolve(model)
    config = AutoConfig.from_pretrained(folder)
    if "pipeline" not in supported_strategies(config) and not (first and last):
        raise MpbookError(f"{config.model_type} models support {', '.join(supported_strategies(config))} only")
    with torch.device("meta"):
        # sdpa: the attention every torch device has, and one that accepts a 4-D mask.
        full = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    body = full.model
    stage_config = copy.deepcopy(full.config)
    stage_config.num_hidden_layers = len(layers)
    if getattr(stage_config, "layer_types", None):
        stage_config.layer_types = [stage_config.layer_types[i] for i in layers]
    body.layers = torch.nn.ModuleList(body.layers[i] for i in layers)
    for local, layer in enumerate(body.layers):
        layer.self_attn.layer_idx = local
        if tp > 1:  # shard the (meta) modules first, so each reads only its slice below
            for path, style in LAYER_PLAN.items():
                shard_linear(layer.get_submodule(path), style, tp_rank, tp)
    full.config = body.config = stage_config

    # Checkpoint name of each tensor this stage keeps.
    wanted: dict[str, str] = {}
    ckpt = _checkpoint_files(folder)
    tied = getattr(config, "tie_word_embeddings", False)
    if first:
        wanted.update({f"model.embed_tokens.{n}": f"model.embed_tokens.{n}" for n, _ in body.embed_tokens.named_parameters()})
    else:
        body.embed_tokens = None
    if last:
        wanted.update({f"model.norm.{n}": f"model.norm.{n}" for n, _ in body.norm.named_parameters()})
        head_source = "lm_head.weight" if "lm_head.weight" in ckpt else "model.embed_tokens.weight"
        wanted["lm_head.weight"] = head_source
    else:
        body.norm = torch.nn.Identity()
        full.lm_head = None
    # Which dimension of a checkpoint tensor to slice for this tp rank.
    split_dim: dict[str, int] = {}
    for local, layer in enumerate(body.layers):
        glob = layers[local]
        for n, _ in layer.named_parameters():
            source = f"model.layers.{glob}.{n}".replace(".bias_after_reduce", ".bias")
            wanted[f"model.layers.{local}.{n}"] = source
            path, _, kind = n.rpartition(".")
            style = LAYER_PLAN.get(path) if tp > 1 else None
            if style == "colwise":
                split_dim[source] = 0  # weight rows and bias: this rank's output features
            elif style == "rowwise" and kind == "weight":
                split_dim[source] = 1  # weight columns: this rank's input features

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, source in wanted.items():
        if source not in ckpt:
            raise MpbookError(f"{folder}: the checkpoint has no tensor {source} (needed for {name})")
        by_file.setdefault(ckpt[source], []).append((name, source))
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name, source in names:
                if source in split_dim:
                    whole = f.get_slice(source)
                    size = whole.get_shape()[split_dim[source]] // tp
                    part = slice(tp_rank * size, (tp_rank + 1) * size)
                    # clone: a slice may be a view that keeps the whole tensor's storage alive
                    tensor = (whole[part] if split_dim[source] == 0 else whole[:, part]).clone()
                else:
                    tensor = f.get_tensor(source)
                state[name] = tensor.to(device=device, dtype=dtype)
    if first and last and tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing = full.load_state_dict(state, strict=False, assign=True).missing_keys
    if missing:
        raise MpbookError(f"{folder}: the checkpoint lacks {', '.join(missing[:5])}")
    if first and last and tied:
        full.lm_head.weight = body.embed_tokens.weight  # keep the tie: one matrix, counted once
    # Non-persistent buffers (RoPE frequencies) are not in the checkpoint: compute them.
    body.rotary_emb = type(body.rotary_emb)(config=config).to(device)
    leftover = [n for n, t in [*full.named_parameters(), *full.named_buffers()] if t.is_meta]
    if leftover:
        raise MpbookError(f"{folder}: no weights were found for {', '.join(leftover[:5])}")
    full.eval()
    full.requires_grad_(False)
    return full
