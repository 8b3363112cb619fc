"""What a causal LM is made of, and what each rank of a layout loads and runs: read from the
model's own parallel plans. Where a model's modules are and how a layout cuts them is read
here and nowhere else; the sizes a run adds to them (heads, head dim, hidden size: the KV
cache and the activations) the planner reads from the config itself
(:class:`mpbook.planner.model_tensors.ModelDims`).

transformers 5 configs carry a model's plans as data:

- ``base_model_pp_plan``: the base model's top-level modules in forward order (embedding(s),
  the decoder-layer list, the final norm). Everything before the layer list is *pre*, after it
  *post*. A family without one (GPT-2, BLOOM, Falcon, ...) falls back to registration order
  around its one ``ModuleList`` of ``num_hidden_layers`` layers.
- ``base_model_tp_plan``: module or parameter pattern -> tensor-parallel style
  (``"layers.*.self_attn.q_proj": "colwise"``); the CausalLM class adds its head
  (``{"lm_head": "colwise_gather_output"}``).
- ``base_model_ep_plan`` (mixture-of-experts models): which tensors are experts
  (``grouped_gemm``) and which module dispatches to them (``ep_dispatch_experts``).

A user may pass plans in the same format for a family without them:
``plans={"tp": {...}, "pp": {...}, "ep": {...}}``, names relative to the base model as in the
config (``"h.*.mlp.c_fc": "colwise"``), head rules by the head's name (``"lm_head"``); a user
rule replaces the family's rule of the same name, and ``None`` removes one.

This module reads the plans into a :class:`Structure`; :mod:`mpbook.models.support` says which
strategies a model supports and checks a layout before any engine works (the client), and
:mod:`mpbook.models.parts` says what each rank of a layout loads and holds (the engines'
loader and the planner read the same data). All three are pure: no engine, no weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..compat import transformers as hf_compat
from ..errors import MpbookError

# Projections whose colwise split splits the attention heads (transformers' get_kv_heads_per_rank
# looks at the key side): tp must then divide the query heads and the KV heads.
HEAD_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack")
# Config attributes that count a mixture-of-experts model's routed experts, by family.
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
EXPERT_STYLES = ("ep_dispatch_experts", "moe_tp_experts")


# ----------------------------------------------------------------------------- plan rules
def generic(name: str) -> str:
    """``model.layers.3.mlp.experts.gate_up_proj`` -> ``model.layers.*.mlp.experts.gate_up_proj``."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def param_rule(name: str, plan: dict[str, str]) -> str | None:
    """A parameter's style: its own rule, else its module's (transformers' ``_get_parameter_plan``)."""
    g = generic(name)
    if g in plan:
        return plan[g]
    return plan.get(g.rsplit(".", 1)[0]) if "." in g else None


def module_rule(name: str, plan: dict[str, str]) -> str | None:
    return plan.get(generic(name))


# ----------------------------------------------------------------------------- the structure
@dataclass(frozen=True)
class Structure:
    """A causal LM's layout and plans, names as the CausalLM holds them (``model.layers.*...``)."""

    model_type: str
    causal_lm_class: str
    base_prefix: str  # attribute of the CausalLM holding the base model: "model", "gpt_neox", "transformer"
    pre: tuple[str, ...]  # base-model modules before the layers, in forward order ("embed_tokens",)
    layers: str  # the decoder-layer ModuleList inside the base model ("layers", "h")
    post: tuple[str, ...]  # base-model modules after the layers ("norm",)
    head: tuple[str, ...]  # CausalLM-level modules after the base model ("lm_head",)
    embedding: str  # the token embedding (get_input_embeddings()), CausalLM-level name
    pp_source: str  # "plan" (the config's), "user", "module order" (no plan: the fallback) or "nested"
    num_layers: int
    layer_types: tuple[str, ...] | None  # per-layer attention kinds (Gemma 2: sliding / full)
    attn_implementation: str  # what transformers picked for this model (or what was asked)
    experts_implementation: str | None
    heads: int
    kv_heads: int
    num_experts: int | None
    vocab_size: int
    embedding_is_table: bool  # an nn.Embedding: it can be split over the vocabulary
    head_is_vocab_linear: bool  # an nn.Linear onto the vocabulary: it can be split over the vocabulary
    tp_plan: dict[str, str] = field(default_factory=dict)  # the family's (and user's) rules, head included
    ep_plan: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)  # tied parameter -> the parameter it reads
    # Names a user plan set explicitly: the vocab-parallel defaults leave them alone.
    user_named: frozenset = field(default=frozenset(), compare=False, repr=False)

    def full(self, name: str) -> str:
        """A base-model-relative module name as a CausalLM-level one."""
        return f"{self.base_prefix}.{name}" if self.base_prefix else name

    @property
    def layer_prefix(self) -> str:
        return self.full(self.layers) + "."

    @property
    def layer_rules(self) -> dict[str, str]:
        """The tp rules inside the decoder layers: what makes tensor parallel worth having."""
        return {k: v for k, v in self.tp_plan.items() if k.startswith(self.layer_prefix)}

    @property
    def experts(self) -> tuple[str, ...]:
        """Generic names of the experts modules (``model.layers.*.mlp.experts``)."""
        found = [k for k, v in {**self.tp_plan, **self.ep_plan}.items() if v in EXPERT_STYLES]
        return tuple(dict.fromkeys(found))

    @property
    def experts_split_by_tp(self) -> bool:
        """Whether the tp plan splits the experts' own weights (each expert over the tp ranks)."""
        return any(k.startswith(e + ".") for e in self.experts for k in self.tp_plan)

    @property
    def heads_split_by_tp(self) -> bool:
        """A ``colwise`` q/k/v projection splits the heads (a gathered one, as in Phi-3's fused
        qkv or OLMo 2's, computes every head on every rank)."""
        return any(k.rsplit(".", 1)[-1] in HEAD_PROJECTIONS and v == "colwise" for k, v in self.layer_rules.items())

    def tp_rules(self) -> dict[str, str]:
        """The rules applied under tp > 1: the plan, with the token embedding and the LM head
        vocab-parallel for every family (``embedding_rowwise``, and ``colwise`` logits over the
        vocabulary that the decode loop reads slice by slice), unless a user rule names them."""
        rules = dict(self.tp_plan)
        if self.embedding_is_table and self.embedding not in self.user_named:
            rules[self.embedding] = "embedding_rowwise"
        if self.head_is_vocab_linear:
            for name in self.head:
                if name not in self.user_named:
                    rules[name] = "colwise"
        return rules

    def describe(self) -> str:
        lines = [
            f"{self.model_type} ({self.causal_lm_class}): base '{self.base_prefix}', attention {self.attn_implementation}"
            + (f", experts {self.experts_implementation} x{self.num_experts}" if self.num_experts else ""),
            f"  pre {list(self.pre)} | layers '{self.layers}' x{self.num_layers} ({self.pp_source}) | post "
            f"{list(self.post)} | head {list(self.head)}",
        ]
        if self.layer_types:
            lines.append(f"  layer_types {list(self.layer_types)}")
        lines.append("  tp " + (", ".join(f"{k}: {v}" for k, v in self.tp_rules().items()) or "-"))
        if self.ep_plan:
            lines.append("  ep " + ", ".join(f"{k}: {v}" for k, v in self.ep_plan.items()))
        if self.tied:
            lines.append(f"  tied {self.tied}")
        return "\n".join(lines)


def meta_model(config, *, attention: str | None = None, experts: str | None = None, dtype=None):
    """The CausalLM of ``config`` on the meta device (shapes, no memory), with the attention
    implementation transformers picks for it unless ``attention`` says otherwise.

    ``from_config`` does NOT copy ``config``: the model and every submodule hold the very
    object, so cutting ``model.config`` edits the caller's config too."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if attention:
        kwargs["attn_implementation"] = attention
    if experts:
        kwargs["experts_implementation"] = experts
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, **kwargs)
    except ValueError as exc:
        text = str(exc).lower()
        if attention and ("attn" in text or "attention" in text):
            raise MpbookError(f"--attn {attention}: {config.model_type} models cannot use it ({_first_line(exc)})") from None
        raise


def structure(model, plans: dict | None = None, *, attention: str | None = None) -> Structure:
    """Read a CausalLM's layout from its plans (and ``plans``, a user's). ``model`` may be a
    config; the structure of a config is built once per config and plans, on the meta device."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return _structure_of_config(model, plans, attention)
    return _read(model, check_plans(plans))


_CACHE: dict[tuple, Structure] = {}


def _structure_of_config(config, plans, attention) -> Structure:
    import copy

    key = (type(config).__name__, config.to_json_string(use_diff=False), plans_key(plans), attention)
    if key not in _CACHE:
        if len(_CACHE) > 32:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = _read(meta_model(copy.deepcopy(config), attention=attention), check_plans(plans))
    return _CACHE[key]


def plans_key(plans: dict | None):
    if not plans:
        return None
    plans = check_plans(plans)
    return tuple((kind, tuple(sorted((k, _freeze(v)) for k, v in rules.items()))) for kind, rules in sorted(plans.items()))


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def check_plans(plans) -> dict:
    if not plans:
        return {}
    if not isinstance(plans, dict) or set(plans) - {"tp", "pp", "ep"}:
        raise MpbookError(
            f"plans={plans!r}: give a dict with keys among 'tp', 'pp', 'ep', each in the format of the config's "
            "base_model_tp_plan / base_model_pp_plan / base_model_ep_plan"
        )
    out = {}
    for kind, rules in plans.items():
        rules = dict(rules) if not isinstance(rules, dict) else rules
        if not all(isinstance(k, str) for k in rules):
            raise MpbookError(f"plans[{kind!r}]: its keys must be module names or patterns like 'layers.*.mlp.down_proj'")
        out[kind] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in rules.items()}
    return out


def _read(model, plans: dict) -> Structure:
    import torch

    config = model.config
    prefix = model.base_model_prefix
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, torch.nn.Module):
        base, prefix = model, ""
    full = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)

    pre, layers, post, pp_source = _pipeline_order(model, base, config, plans.get("pp"))
    head_pp = hf_compat.head_pp_plan(model)
    head = tuple(n for n in head_pp if hasattr(model, n)) or tuple(n for n in ("lm_head",) if hasattr(model, n))

    def absolute(name: str) -> str:
        first = name.split(".", 1)[0]
        if prefix and (name == prefix or name.startswith(prefix + ".")):
            return name
        if first in head or (hasattr(model, first) and not hasattr(base, first)):
            return name
        return full(name)

    user_named: set[str] = set()

    def merged(own: dict, user: dict | None) -> dict:
        rules = dict(own)
        for key, style in (user or {}).items():
            key = absolute(key)
            user_named.add(key)
            if style is None:
                rules.pop(key, None)
            else:
                rules[key] = style
        return rules

    tp_plan = merged(dict(getattr(model, "tp_plan", None) or {}), plans.get("tp"))
    ep_plan = merged(dict(getattr(model, "ep_plan", None) or {}), plans.get("ep"))

    embedding_module = model.get_input_embeddings()
    embedding = next((full(n) for n, m in base.named_modules() if m is embedding_module and n), None)
    if embedding is None:
        raise MpbookError(f"{config.model_type}: its token embedding is not inside its base model; mpbook cannot cut it")
    head_module = model.get_submodule(head[0]) if head else None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = text.vocab_size
    heads = getattr(text, "num_attention_heads", None) or 0
    kv_heads = getattr(text, "num_key_value_heads", None) or getattr(text, "num_kv_heads", None) or heads
    layer_types = getattr(config, "layer_types", None)
    s = Structure(
        model_type=config.model_type,
        causal_lm_class=type(model).__name__,
        base_prefix=prefix,
        pre=pre,
        layers=layers,
        post=post,
        head=head,
        embedding=embedding,
        pp_source=pp_source,
        num_layers=len(base.get_submodule(layers)),
        layer_types=tuple(layer_types) if layer_types else None,
        attn_implementation=hf_compat.attn_implementation(config),
        experts_implementation=hf_compat.experts_implementation(config),
        heads=heads,
        kv_heads=kv_heads,
        num_experts=None,
        vocab_size=vocab,
        embedding_is_table=isinstance(embedding_module, torch.nn.Embedding) and embedding_module.num_embeddings == vocab,
        head_is_vocab_linear=isinstance(head_module, torch.nn.Linear) and head_module.out_features == vocab,
        tp_plan=tp_plan,
        ep_plan=ep_plan,
        tied=dict(getattr(model, "all_tied_weights_keys", None) or {}),
        user_named=frozenset(user_named),
    )
    return _with_experts(s, model)


def _with_experts(s: Structure, model) -> Structure:
    """The routed experts' count, read off the first experts module the plans name."""
    import dataclasses

    if not s.experts:
        return s
    for name, module in model.named_modules():
        if generic(name) in s.experts:
            count = getattr(module, "num_experts", None)
            if count is None:
                params = [p for p in module.parameters(recurse=False) if p.dim() == 3]
                count = params[0].shape[0] if params else None
            return dataclasses.replace(s, num_experts=count)
    return s


def _pipeline_order(model, base, config, user_pp):
    """(pre, layers, post, source) from the pp plan, or from module order without one."""
    import torch

    base_pp = dict(user_pp or getattr(config, "base_model_pp_plan", None) or {})
    source = "user" if user_pp else "plan"
    if base_pp:
        names = [n for n in base_pp if _has(base, n)]
        containers = [n for n in names if isinstance(base.get_submodule(n), torch.nn.ModuleList)]
        if len(containers) == 1:
            at = names.index(containers[0])
            return tuple(names[:at]), containers[0], tuple(names[at + 1:]), source
        if user_pp:
            raise MpbookError(
                f"plans['pp'] names {len(containers)} layer lists ({', '.join(containers) or 'none'}) of "
                f"{config.model_type}'s base model; name its modules in forward order with exactly one ModuleList"
            )
    # No pp plan: the one ModuleList as long as the layer count, and the parameter-holding
    # modules around it in registration order (glue without parameters, rotary embeddings, is
    # not a stage's business: the base forward builds it wherever it runs).
    children = list(base.named_children())
    count = getattr(config.get_text_config(), "num_hidden_layers", None)
    lists = [n for n, m in children if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if len(lists) != 1:
        nested = _nested_layers(base, count)
        if len(nested) == 1:
            # The decoder sits inside another module (a multimodal model's language model): its
            # layers are found for tensor and expert parallel, which need nothing else; a stage
            # is not cut there (see PIPELINE_SOURCES).
            return (), nested[0], (), "nested"
        raise NoPipeline(f"{config.model_type} has no base_model_pp_plan and its base model has no single list of "
                          f"its {count} decoder layers")
    at = [n for n, _ in children].index(lists[0])

    def holds(m):
        return any(True for _ in m.parameters())

    pre = tuple(n for n, m in children[:at] if holds(m))
    post = tuple(n for n, m in children[at + 1:] if holds(m))
    return pre, lists[0], post, "module order"


def _nested_layers(base, count: int) -> list[str]:
    """Lists of ``count`` modules inside the base model's decoder (``get_decoder()``: a
    multimodal model's language model, not its vision tower), as names inside ``base``."""
    import torch

    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if not isinstance(decoder, torch.nn.Module) or decoder is base:
        return []
    at = next((n for n, m in base.named_modules() if m is decoder), None)
    if not at:
        return []
    return [f"{at}.{n}" for n, m in decoder.named_modules()
            if n and isinstance(m, torch.nn.ModuleList) and len(m) == count]


# Where a structure's stage order comes from, for those it can be cut by ("nested": the layers
# were found inside another module, with no order of the modules around them).
PIPELINE_SOURCES = ("plan", "user", "module order")


class NoPipeline(MpbookError):
    """The model's layers cannot be found: no pipeline, and no structure to cut."""


def _has(module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
