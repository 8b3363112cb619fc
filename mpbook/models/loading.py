"""Loading just the part of a model that a rank needs, reading only its tensors."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MpbookError
from .source import checkpoint_files, resolve


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


def load_whole(model: str | os.PathLike, *, dtype, device):
    """The whole model, from safetensors only (for architectures run data parallel)."""
    from transformers import AutoModelForCausalLM

    folder = resolve(model)
    checkpoint_files(folder)  # a clear error when there is no safetensors checkpoint
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
    from ..parallel.tensor import LAYER_PLAN, shard_linear
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
    ckpt = checkpoint_files(folder)
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
