"""A tiny config of any causal-LM family, found from the config's own attributes.

transformers' configs name their sizes in a small number of ways (``hidden_size``/``d_model``/
``n_embd``, ``num_key_value_heads``/``num_kv_heads``, ``n_routed_experts``/``num_local_experts``
...). :func:`shrink_config` starts from a family's default config and gives every attribute
whose *name* says what it measures (width, heads, KV heads, head size, experts, vocabulary,
windows, layers) a small value, in the config and its sub-configs alike; nothing here names a
family. Per-layer lists (``layer_types``, ``mlp_layer_types``...) keep one layer of every kind
the family mixes (sliding and full attention, dense and MoE), so that a 4-layer model still has
each. The presets' tokenizer fixes the vocabulary and the special tokens' ids.

Used by ``python -m mpbook conformance`` (:mod:`mpbook.conformance`) to try every strategy on
every family transformers ships.
"""

from __future__ import annotations

import re

from .tokenizer import TOKENIZER_IDS

LAYERS = 4
HEAD_DIM = 16
INTERMEDIATE = 128
EXPERT_INTERMEDIATE = 32
EXPERTS = 4
EXPERTS_PER_TOKEN = 2
LOW_RANK = 16
STATE = 16
WINDOW = 4  # shorter than the conformance prompts, so that sliding layers slide
POSITIONS = 256

# Attribute names by what they measure (full matches). Families spell the same quantity in
# different ways; the lists are of spellings, not of families.
_SIZES: list[tuple[str, object]] = [
    (r"num_hidden_layers|n_layers?|num_layers|decoder_layers|encoder_layers", "layers"),
    (r"hidden_size|d_model|n_embd|embed_dim|dim_model|attention_hidden_size|embedding_size|word_embed_proj_dim",
     "width"),
    (r"num_attention_heads|n_heads?|num_heads|decoder_attention_heads|encoder_attention_heads|swa_num_attention_heads|"
     r"linear_num_value_heads|linear_num_heads|index_n_heads", "heads"),
    (r"num_key_value_heads|num_kv_heads|n_head_kv|multi_query_group_num|swa_num_key_value_heads|"
     r"linear_num_key_heads", "kv_heads"),
    (r"head_dim|swa_head_dim|attention_head_dim|kv_channels|dim_head|qk_head_dim|v_head_dim|index_head_dim|"
     r"linear_key_head_dim|linear_value_head_dim|linear_head_dim", HEAD_DIM),
    (r"qk_rope_head_dim|qk_nope_head_dim|rotary_dim", HEAD_DIM),
    (r"intermediate_size|ffn_dim|n_inner|decoder_ffn_dim|encoder_ffn_dim|ffn_hidden_size|dim_ff|dff|"
     r"intermediate_size_mlp|"
     r"dense_intermediate_size", INTERMEDIATE),
    (r"moe_intermediate_size|shared_expert_intermediate_size|shared_experts_intermediate_size|"
     r"shared_intermediate_size|expert_ffn_hidden_size", EXPERT_INTERMEDIATE),
    (r"num_local_experts|num_experts|n_routed_experts|moe_num_experts|num_routed_experts", EXPERTS),
    (r"num_experts_per_tok|num_experts_per_token|moe_topk|moe_k|top_k", EXPERTS_PER_TOKEN),
    (r"n_group|num_expert_group", 2),
    (r"topk_group", 1),
    (r"n_shared_experts|num_shared_experts|moe_num_shared_experts", 1),
    (r"kv_lora_rank|q_lora_rank|o_lora_rank|laurel_rank|hc_lowrank|gated_norm_rank|loop_gate_rank", LOW_RANK),
    (r"mamba_d_state|state_size|d_state", STATE),
    (r"vocab_size|unpadded_vocab_size|decoder_vocab_size|vocab_size_per_layer_input",
     TOKENIZER_IDS["vocab_size"]),
    (r"max_position_embeddings|n_positions|n_ctx|max_seq_len", POSITIONS),
    (r"sliding_window|sliding_window_size|attention_chunk_size|local_attention_window_len|window_size", WINDOW),
]
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
# Sizes a default config may leave None for the model to derive (head_dim = width / heads):
# given, so that the tiny model's heads are the ones chosen here.
_FILLED = ("head_dim", "num_key_value_heads", "num_kv_heads")
_ROUTING = ("num_experts_per_tok", "n_group", "topk_group")
_RULES = [(re.compile(f"(?:{pattern})"), value) for pattern, value in _SIZES]


def target(name: str, value, *, heads: int, kv_heads_of) -> object | None:
    """The small value for attribute ``name`` (now ``value``), or None to leave it."""
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        return None
    for pattern, small in _RULES:
        if not pattern.fullmatch(name):
            continue
        if small == "layers":
            return LAYERS if isinstance(value, int) else None
        if small == "width":
            small = heads * HEAD_DIM
        elif small == "heads":
            small = heads
        elif small == "kv_heads":
            small = kv_heads_of(value)
        if isinstance(value, list):  # one size per layer
            return [small] * min(len(value), LAYERS) if all(isinstance(v, int) for v in value) else None
        if not value:  # 0 or None-like: the family has none of this (no window, no experts)
            return None
        return small
    return None


def shrink_config(model_type: str, *, engines: int = 2):
    """A tiny config of ``model_type`` with the presets' vocabulary and token ids: 4 layers,
    ``2 * engines`` attention heads of size 16 (width 64 on 2 engines), ``engines`` KV heads
    under grouped-query attention (one under multi-query, one per head under multi-head), 4
    experts (2 per token), windows of 4 tokens: tp, pp and ep up to ``engines`` divide it."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    overrides = _overrides(default.to_dict(), heads=2 * engines, engines=engines)
    # An attribute the config derives from others (DeepSeek's head_dim is its rope head size,
    # qk_head_dim the sum of two others) follows them: set, it would contradict them.
    for name in [k for k, v in overrides.items() if isinstance(v, int)]:
        try:
            without = AutoConfig.for_model(model_type, **{k: v for k, v in overrides.items() if k != name})
        except Exception:  # noqa: BLE001  it cannot be left out: keep it
            continue
        if getattr(without, name, None) != getattr(default, name, None):
            del overrides[name]
    try:
        return AutoConfig.for_model(model_type, **overrides)
    except Exception:  # noqa: BLE001  a family that refuses a value: it keeps its own there
        for name in list(overrides):
            kept = {k: v for k, v in overrides.items() if k != name}
            try:
                config = AutoConfig.for_model(model_type, **kept)
            except Exception:  # noqa: BLE001
                continue
            return config
        raise


def _overrides(values: dict, *, heads: int, engines: int) -> dict:
    """What to change in a config's dict (and, recursively, its sub-configs')."""
    full_heads = next((values[k] for k in ("num_attention_heads", "n_head", "n_heads", "num_heads")
                       if isinstance(values.get(k), int)), None)

    def kv_heads_of(kv: int) -> int:
        if not isinstance(kv, int) or kv <= 0:
            return kv
        if kv == 1:
            return 1  # multi-query attention stays multi-query
        if full_heads and kv >= full_heads:
            return heads  # one KV head per query head
        return engines

    out: dict = {}
    if any(isinstance(values.get(k), int) and values[k] > 0 for k in _EXPERT_COUNTS):
        # A mixture of experts whose routing sizes default to None (decided at load time).
        for name in _ROUTING:
            if name in values and values[name] is None:
                out[name] = {"topk_group": 1}.get(name, 2)
    old_layers = next((values[k] for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
                       if isinstance(values.get(k), int)), None)
    for name, value in values.items():
        if isinstance(value, dict) and "model_type" in value:  # a sub-config (text, vision...)
            out[name] = {**value, **_overrides(value, heads=heads, engines=engines)}
            continue
        if value is None and name in _FILLED:  # derived when the model is built: say it here
            value = full_heads if name in ("num_key_value_heads", "num_kv_heads") else HEAD_DIM
            out[name] = value
        small = target(name, value, heads=heads, kv_heads_of=kv_heads_of)
        if small is not None and small != value:
            out[name] = small
    out.update({k: v for k, v in TOKENIZER_IDS.items() if k in values or k == "vocab_size"})
    if old_layers and old_layers > LAYERS:
        out.update(_fewer_layers(values, old_layers, LAYERS))
    return out


def _fewer_layers(values: dict, old: int, new: int) -> dict:
    """Per-layer lists cut to ``new`` layers keeping one layer of every kind each list mixes
    (the first of each), then the first layers, in their order; lists of layer indices
    renumbered to the kept layers."""
    per_layer = {k: v for k, v in values.items() if isinstance(v, list) and len(v) == old and "layer" in k}
    keep: list[int] = []
    for values_of_layer in per_layer.values():
        seen = set()
        for i, v in enumerate(values_of_layer):
            key = repr(v)
            if key not in seen:
                seen.add(key)
                if i not in keep:
                    keep.append(i)
    for k, v in values.items():  # lists of layer indices (the attention layers of a hybrid)
        if _is_index_list(k, v, old) and k not in per_layer and v[0] not in keep:
            keep.append(v[0])
    keep = sorted(keep)[:new]
    keep += [i for i in range(old) if i not in keep][: new - len(keep)]
    keep = sorted(keep)
    out = {k: [v[i] for i in keep] for k, v in per_layer.items()}
    position = {old_index: new_index for new_index, old_index in enumerate(keep)}
    for k, v in values.items():  # settings per layer, keyed by the layer's index
        if isinstance(v, dict) and v and "layer" in k and all(str(i).isdigit() for i in v):
            out[k] = {position[int(i)]: setting for i, setting in v.items() if int(i) in position}
    for k, v in values.items():
        if k not in per_layer and _is_index_list(k, v, old):
            out[k] = [position[i] for i in v if i in position]
    return out


def _is_index_list(name: str, value, layers: int) -> bool:
    return (isinstance(value, list) and bool(value) and ("layer" in name or "idx" in name)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in value) and max(value) < layers)
