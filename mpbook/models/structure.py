"""What a causal LM is made of, and what each rank of a layout loads and runs: read from the
model's own parallel plans. The one place in mpbook that knows about model structure.

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

This module is pure: the client calls :func:`supported_strategies` and :func:`check_layout`
before any engine works; the engines' loader (:mod:`mpbook.models.loading`) and the planner
read :func:`structure`, :func:`rank_part` and :func:`held_tensors`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import MpbookError
from ..units import divisors

STRATEGIES = ("data", "pipeline", "tensor", "expert")
OWN_DIM = {"pipeline": "pp", "tensor": "tp", "expert": "ep"}
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
    pp_source: str  # "plan" (the config's), "user" or "module order" (no plan: the fallback)
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
    return _read(model, _check_plans(plans))


_CACHE: dict[tuple, Structure] = {}


def _structure_of_config(config, plans, attention) -> Structure:
    import copy

    key = (type(config).__name__, config.to_json_string(use_diff=False), _plans_key(plans), attention)
    if key not in _CACHE:
        if len(_CACHE) > 32:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = _read(meta_model(copy.deepcopy(config), attention=attention), _check_plans(plans))
    return _CACHE[key]


def _plans_key(plans: dict | None):
    if not plans:
        return None
    plans = _check_plans(plans)
    return tuple((kind, tuple(sorted((k, _freeze(v)) for k, v in rules.items()))) for kind, rules in sorted(plans.items()))


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _check_plans(plans) -> dict:
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
    head_pp = dict(getattr(type(model), "_pp_plan", None) or {})
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
        attn_implementation=config._attn_implementation,
        experts_implementation=getattr(config, "_experts_implementation", None),
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
        raise _NoPipeline(f"{config.model_type} has no base_model_pp_plan and its base model has no single list of "
                          f"its {count} decoder layers")
    at = [n for n, _ in children].index(lists[0])

    def holds(m):
        return any(True for _ in m.parameters())

    pre = tuple(n for n, m in children[:at] if holds(m))
    post = tuple(n for n, m in children[at + 1:] if holds(m))
    return pre, lists[0], post, "module order"


class _NoPipeline(MpbookError):
    """The model's layers cannot be found: no pipeline, and no structure to cut."""


def _has(module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# ----------------------------------------------------------------------------- client checks
def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _config_plans(config, plans: dict | None) -> tuple[dict, dict, dict]:
    """The config's own (base-relative) tp / pp / ep plans with a user's rules merged in."""
    plans = _check_plans(plans)
    out = []
    for kind, attr in (("tp", "base_model_tp_plan"), ("pp", "base_model_pp_plan"), ("ep", "base_model_ep_plan")):
        own = getattr(config, attr, None) or getattr(_text(config), attr, None) or {}
        rules = dict(own)
        for key, value in (plans.get(kind) or {}).items():
            if value is None:
                rules.pop(key, None)
            else:
                rules[key] = value
        out.append(rules)
    return tuple(out)


def recurrent_state(config) -> bool:
    """Whether some of the model's layers keep a recurrent state (state-space models such as
    Mamba, linear attention, hybrids such as Jamba) instead of, or besides, a KV cache: the
    cache transformers builds for the config says."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in DynamicCache(config=config).layers)
    except Exception:  # noqa: BLE001  a config the cache cannot read: an attention model
        return False


def takes_a_cache(config) -> bool:
    """Whether the model's forward takes transformers' ``cache`` (RWKV keeps a state of its own
    that generate threads through, which mpbook's decode loop does not)."""
    import inspect

    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except Exception:  # noqa: BLE001  not a causal LM transformers knows: let loading say so
        return True
    return "cache" in inspect.signature(model_class.forward).parameters


def supported_strategies(config, plans: dict | None = None) -> tuple[str, ...]:
    """The strategies mpbook can run ``config``'s model with: data for every causal LM whose
    forward takes a cache (all but RWKV); for models with a KV cache only (no recurrent state),
    pipeline when a pp plan (the config's or ``plans``') or the module order gives its layers,
    tensor when a tp plan splits its decoder layers with styles mpbook implements, expert when
    an ep plan names its experts."""
    return tuple(s for s in STRATEGIES if why_not(config, s, plans) is None)


def why_not(config, strategy: str, plans: dict | None = None) -> str | None:
    """Why ``strategy`` cannot split ``config``'s model (None: it can), in a few words."""
    from ..parallel.tensor import IMPLEMENTED

    tp, pp, ep = _config_plans(config, plans)
    mt = config.model_type
    if not takes_a_cache(config):
        return f"{mt}'s forward takes no cache (it threads a state of its own), which mpbook's decode loop does not carry"
    if strategy == "data":
        return None
    if strategy in OWN_DIM and recurrent_state(config):
        return (f"{mt}'s layers keep a recurrent state (state-space or linear attention), which mpbook's "
                "stages and shards do not carry")
    if strategy == "pipeline":
        if pp:
            return None
        try:
            structure(config, plans)
        except _NoPipeline as exc:
            return f"{exc}, so mpbook cannot find its stages"
        except MpbookError as exc:
            return str(exc)
        return None
    if strategy == "tensor":
        if not any("*" in k for k in tp):
            return f"{mt} has no tensor-parallel plan for its decoder layers (its config carries no base_model_tp_plan)"
        odd = {k: v for k, v in tp.items() if v not in IMPLEMENTED}
        if odd:
            key, style = next(iter(odd.items()))
            return f"{mt}'s tensor-parallel plan gives {key} the style {style!r}, which mpbook does not implement"
        return None
    if strategy == "expert":
        if not ep:
            return f"{mt} has no expert-parallel plan (its config carries no base_model_ep_plan: not a mixture of experts)"
        odd = {k: v for k, v in ep.items() if v not in IMPLEMENTED}
        if odd:
            key, style = next(iter(odd.items()))
            return f"{mt}'s expert-parallel plan gives {key} the style {style!r}, which mpbook does not implement"
        return None
    raise MpbookError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def _user_plan_hint(strategy: str) -> str:
    example = {
        "pipeline": "plans={'pp': {'embed_tokens': ..., 'layers': ..., 'norm': ...}} (base_model_pp_plan's format)",
        "tensor": "plans={'tp': {'layers.*.self_attn.q_proj': 'colwise', ...}} (base_model_tp_plan's format)",
        "expert": "plans={'ep': {...}} (base_model_ep_plan's format)",
    }[strategy]
    return f"to split it anyway, pass {example}"


def check_layout(config, layout, plans: dict | None = None, *, stage_sizes=None) -> None:
    """Raise :class:`MpbookError` unless ``layout`` can split ``config``'s model: each error one
    line with the model's own numbers and the valid choices."""
    from ..parallel.pipeline import split_layers

    allowed = supported_strategies(config, plans)
    if not allowed:
        raise MpbookError(f"{why_not(config, 'data', plans)}; mpbook cannot run {config.model_type} models")
    for strategy, dim in OWN_DIM.items():
        degree = getattr(layout, dim)
        if degree > 1 and strategy not in allowed:
            reason = why_not(config, strategy, plans)
            # A plan cannot carry a recurrent state across stages or shards: no hint then.
            hint = "" if recurrent_state(config) else f"; {_user_plan_hint(strategy)}"
            raise MpbookError(
                f"{dim}={degree}: {reason}; {config.model_type} works with {', '.join(allowed)} parallelism{hint}"
            )
    text = _text(config)
    if layout.pp > 1:
        split_layers(text.num_hidden_layers, layout.pp, stage_sizes)
    if layout.tp > 1:
        s = structure(config, plans)
        if s.heads_split_by_tp and (s.heads % layout.tp or s.kv_heads % layout.tp):
            valid = ", ".join(str(d) for d in divisors(s.heads) if s.kv_heads % d == 0)
            if s.heads % layout.tp:
                what = f"the {s.heads} attention heads ({s.kv_heads} KV heads)"
            else:
                what = f"the {s.kv_heads} KV heads ({s.heads} attention heads)"
            raise MpbookError(
                f"tp={layout.tp} does not divide {what} of this {config.model_type} model; choose tp in {{{valid}}}"
            )
    if layout.ep > 1:
        experts = num_experts(config, plans)
        if experts is None or experts % layout.ep:
            valid = ", ".join(str(d) for d in divisors(experts or 1))
            raise MpbookError(
                f"ep={layout.ep} does not divide the {experts} experts of this {config.model_type} model; "
                f"choose ep in {{{valid}}}"
            )


def num_experts(config, plans: dict | None = None) -> int | None:
    """How many routed experts each MoE layer of ``config``'s model has (None: not a MoE)."""
    text = _text(config)
    for attr in EXPERT_COUNTS:
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return structure(config, plans).num_experts


# ----------------------------------------------------------------------------- each rank's part
@dataclass(frozen=True)
class Part:
    """What one rank of a layout loads and runs: its stage's layers, and its shards."""

    layers: range  # global indices of its decoder layers
    first: bool  # holds the token embedding
    last: bool  # holds the final norm and the head
    tp: int
    tp_rank: int
    ep: int
    ep_rank: int
    tp_plan: dict[str, str]  # the rules applied (empty when tp == 1)
    ep_plan: dict[str, str]  # (empty when ep == 1)
    experts_reduce: tuple[str, ...]  # the mesh dims the experts' one all-reduce runs over

    def rule(self, name: str, *, param: bool) -> tuple[str | None, str | None]:
        """(style, "tp" or "ep") of a parameter or module; an ep rule wins over a tp one for the
        module it names. A parameter split both ways (an expert under ep x tp) reports its ep
        rule here; :meth:`pieces` applies both."""
        find = param_rule if param else module_rule
        for plan, kind in ((self.ep_plan, "ep"), (self.tp_plan, "tp")):
            style = find(name, plan) if plan else None
            if style:
                return style, kind
        return None, None

    def pieces(self, name: str, shape: tuple[int, ...], *, transposed: bool = False) -> list:
        """The slices of parameter ``name`` (full ``shape``) this rank keeps."""
        from ..parallel.tensor import shard_pieces

        out = []
        leaf = name.rsplit(".", 1)[-1]
        ep_style = param_rule(name, self.ep_plan) if self.ep_plan else None
        tp_style = param_rule(name, self.tp_plan) if self.tp_plan else None
        if ep_style:
            out += shard_pieces(ep_style, leaf, shape, self.ep_rank, self.ep, transposed=transposed)
        if tp_style:
            out += shard_pieces(tp_style, leaf, shape, self.tp_rank, self.tp, transposed=transposed)
        return out


def rank_part(s: Structure, layout, coords, *, stage_sizes=None) -> Part:
    """The :class:`Part` of the rank at ``coords`` of ``layout``."""
    from ..parallel.pipeline import split_layers

    stages = split_layers(s.num_layers, layout.pp, stage_sizes)
    tp_plan = s.tp_rules() if layout.tp > 1 else {}
    ep_plan = dict(s.ep_plan) if layout.ep > 1 else {}
    if ep_plan and not (layout.tp > 1 and s.experts_split_by_tp):
        # transformers' rule: an ep module keeps no tp rule (here: when its weights are not split by tp)
        tp_plan = {k: v for k, v in tp_plan.items() if not any(k == e or k.startswith(e + ".") for e in s.experts)}
    elif ep_plan:
        # ep x tp: the experts keep their tp slices, and the ep dispatch's all-reduce does the
        # tp sum as well: no moe_tp_experts all-reduce of their own.
        tp_plan = {k: v for k, v in tp_plan.items() if v != "moe_tp_experts"}
    reduce: tuple[str, ...] = ()
    if layout.ep > 1:
        reduce = ("ep", "tp") if layout.tp > 1 and s.experts_split_by_tp else ("ep",)
    elif layout.tp > 1 and s.experts:
        reduce = ("tp",)
    return Part(
        layers=stages[coords.pp], first=coords.pp == 0, last=coords.pp == layout.pp - 1,
        tp=layout.tp, tp_rank=coords.tp, ep=layout.ep, ep_rank=coords.ep,
        tp_plan=tp_plan, ep_plan=ep_plan, experts_reduce=reduce,
    )


def groups_needed(s: Structure, layout) -> list[tuple[str, ...]]:
    """The mesh groups a layout's ranks use, in the order every rank makes them."""
    out = []
    if layout.tp > 1:
        out.append(("tp",))
    if layout.ep > 1:
        out.append(("ep",))
        if layout.tp > 1 and s.experts_split_by_tp:
            out.append(("ep", "tp"))
    return out


class Absent:
    """Marker base: a module a stage does not hold (see :func:`cut_stage`)."""


def _absent(name: str):
    import torch

    class AbsentModule(torch.nn.Module, Absent):
        """Stands in for a module this pipeline stage does not hold; fails loudly if called."""

        def __init__(self):
            super().__init__()
            self.name = name

        def forward(self, *args, **kwargs):
            raise RuntimeError(f"{self.name} is not held by this pipeline stage")

    return AbsentModule()


def cut_stage(model, s: Structure, part: Part) -> None:
    """Cut a (meta) CausalLM down to ``part``'s stage, in place: the layer list keeps only the
    stage's layers, renumbered from 0 (every submodule's ``layer_idx``), so the stage's own cache
    and masks see exactly the layers it holds; a later stage drops the token embedding (other
    pre-layer modules are glue the base forward applies to ``inputs_embeds``, kept); a non-last
    stage drops the head and replaces the final modules with Identity. The config is not
    touched: :func:`narrow_config` does that once the buffers are made."""
    import torch

    base = model.get_submodule(s.base_prefix) if s.base_prefix else model
    container = base.get_submodule(s.layers)
    kept = torch.nn.ModuleList(container[i] for i in part.layers)
    _set_submodule(base, s.layers, kept)
    for local, layer in enumerate(kept):
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = local
    if not part.first:
        _set_submodule(model, s.embedding, _absent(s.embedding))
    if not part.last:
        for name in s.post:
            _set_submodule(base, name, torch.nn.Identity())
        for name in s.head:
            _set_submodule(model, name, _absent(name))


def narrow_config(config, layers: range) -> None:
    """The config every module of a cut model reads, sliced in place to the stage's layers."""
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]


def _set_submodule(root, name: str, module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def global_name(s: Structure, part: Part, name: str) -> str:
    """A cut model's parameter name as the whole model's (layer numbers back to global)."""
    prefix = s.layer_prefix
    if not name.startswith(prefix):
        return name
    local, _, rest = name[len(prefix):].partition(".")
    return f"{prefix}{part.layers[int(local)]}.{rest}"


# ----------------------------------------------------------------------------- what a rank holds
@dataclass(frozen=True)
class Held:
    """One tensor a rank holds: its name in the whole model, its local shape and bytes."""

    name: str
    shape: tuple[int, ...]
    nbytes: int
    kind: str  # "embedding", "layers", "experts", "norm", "head", "other", "buffer"
    shared_with: str | None = None  # a tied tensor held once (counted under the name it reads)


def held_tensors(config, layout, rank: int, *, plans: dict | None = None, stage_sizes=None,
                 dtype: str = "float32", attention: str | None = None) -> list[Held]:
    """Every parameter and buffer the rank ``rank`` of ``layout`` holds, as the engines load it
    (:func:`cut_stage`, then each tensor's slices): its stage's tensors, split by its tp and ep
    rules (experts by ep, the vocabulary by tp). What the planner counts.

    The whole model's tensors are read once per (config, plans, dtype, attention); a rank's
    are then picked from them, with each rule resolved once per tensor name pattern, so asking
    for every rank of many layouts stays cheap."""
    s = structure(config, plans, attention=attention)
    part = rank_part(s, layout, layout.coords(rank), stage_sizes=stage_sizes)
    params, buffers = _inventory(config, plans, dtype, attention)
    layer_prefix = s.layer_prefix
    last_only = tuple(s.full(p) + "." for p in s.post) + tuple(h + "." for h in s.head)

    def held(name: str) -> bool:
        if name.startswith(layer_prefix):
            return int(name[len(layer_prefix):].split(".", 1)[0]) in part.layers
        if name.startswith(s.embedding + "."):
            return part.first
        if name.startswith(last_only):
            return part.last
        return True  # glue every stage keeps (GPT-2's position embedding, rotary buffers)

    memo: dict[tuple, tuple[list, tuple, str]] = {}  # (pattern, shape, transposed) -> pieces, local shape, kind
    out: list[Held] = []
    seen: dict[int, tuple[str, list]] = {}  # a tensor held under two names (a tied head): its first name, slices
    for name, pattern, key, full, element_size, transposed in params:
        if not held(name):
            continue
        found = memo.get((pattern, full, transposed))
        if found is None:
            pieces = part.pieces(name, full, transposed=transposed)
            found = memo[(pattern, full, transposed)] = (pieces, _local_shape(full, pieces), _kind(s, name))
        pieces, shape, kind = found
        first = seen.get(key)
        if first is not None and first[1] == pieces:
            # tied, and both sides take the same slice: one tensor (the loader ties them again)
            out.append(Held(name, (), 0, kind, shared_with=first[0]))
            continue
        seen.setdefault(key, (name, pieces))
        out.append(Held(name, shape, _prod(shape) * element_size, kind))
    for name, full, element_size in buffers:
        if held(name):
            out.append(Held(name, full, _prod(full) * element_size, "buffer"))
    return out


_INVENTORY: dict[tuple, tuple[list, list]] = {}


def _inventory(config, plans, dtype: str, attention):
    """The whole model's parameters (name, its pattern, identity, shape, element size,
    Conv1D-transposed) and buffers (name, shape, element size), from its meta-device tree."""
    import copy

    import torch

    from ..parallel.tensor import _transposed
    from ..protocol import DTYPES

    key = (type(config).__name__, config.to_json_string(use_diff=False), _plans_key(plans), dtype, attention)
    if key not in _INVENTORY:
        model = meta_model(copy.deepcopy(config), attention=attention, dtype=getattr(torch, DTYPES[dtype]))
        modules = dict(model.named_modules())
        params = [(name, generic(name), id(p), tuple(p.shape), p.element_size(),
                   _transposed(modules[name.rpartition(".")[0]]))
                  for name, p in model.named_parameters(remove_duplicate=False)]
        buffers = [(name, tuple(b.shape), b.element_size()) for name, b in model.named_buffers()]
        if len(_INVENTORY) > 16:
            _INVENTORY.pop(next(iter(_INVENTORY)))
        _INVENTORY[key] = (params, buffers)
    return _INVENTORY[key]


def held_bytes(tensors: list[Held]) -> dict[str, int]:
    """Bytes by kind ("embedding", "layers", "experts", "norm", "head", "other", "buffer") of
    :func:`held_tensors`' answer, and their "parameters" total (buffers apart)."""
    out: dict[str, int] = {}
    for t in tensors:
        out[t.kind] = out.get(t.kind, 0) + t.nbytes
    out["parameters"] = sum(t.nbytes for t in tensors if t.kind != "buffer")
    return out


def _kind(s: Structure, name: str) -> str:
    """Where a tensor belongs: "embedding" (the token embedding), "layers", "experts", "norm"
    (the modules after the layers), "head", or "other" (glue every stage keeps)."""
    g = generic(name)
    if any(g.startswith(e + ".") for e in s.experts):
        return "experts"
    if g.startswith(s.layer_prefix):
        return "layers"
    if name.startswith(s.embedding + "."):
        return "embedding"
    if any(name.startswith(h + ".") for h in s.head):
        return "head"
    if any(name.startswith(s.full(p) + ".") for p in s.post):
        return "norm"
    return "other"


def _local_shape(shape: tuple[int, ...], pieces) -> tuple[int, ...]:
    out = list(shape)
    by_dim: dict[int, int] = {}
    for p in pieces:
        d = p.dim % len(shape)
        by_dim[d] = by_dim.get(d, 0) + (p.stop - p.start)
    for d, n in by_dim.items():
        out[d] = n
    return tuple(out)


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def kv_heads_per_rank(s: Structure, tp: int) -> int:
    """KV heads each rank caches: split by tp when its plan splits the heads, else all of them
    (a gathered qkv, or expert parallel, which replicates attention)."""
    return s.kv_heads // tp if tp > 1 and s.heads_split_by_tp else s.kv_heads


# ----------------------------------------------------------------------------- the README's table
def architecture_table(model_types=None, *, markdown: bool = True) -> str:
    """Which causal-LM families get which strategies in mpbook, from what mpbook reads: each
    family's default config's plans (and, without a pp plan, its module order). Families whose
    default config transformers cannot build are left out."""
    import warnings

    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rows = []
    for model_type in sorted(model_types or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = _small(AutoConfig.for_model(model_type))
                strategies = supported_strategies(config)
                order = "plan" if _config_plans(config, None)[1] else "module order"
        except Exception:  # noqa: BLE001  a family transformers cannot build from its defaults
            continue
        rows.append((model_type, strategies, order))
    head = ["architecture (`model_type`)", "data", "pipeline", "tensor", "expert"]
    lines = []
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
    for model_type, strategies, order in rows:
        marks = []
        for s in STRATEGIES:
            mark = "yes" if s in strategies else "-"
            if s == "pipeline" and s in strategies and order == "module order":
                mark = "yes (module order)"
            marks.append(mark)
        lines.append("| " + " | ".join([f"`{model_type}`", *marks]) + " |" if markdown else
                     f"{model_type:<28} " + " ".join(f"{m:<18}" for m in marks))
    return "\n".join(lines)


def _small(config):
    """The same family with 2 layers (the plans do not depend on the depth), quick to build on meta."""
    text = _text(config)
    try:
        if isinstance(getattr(text, "num_hidden_layers", None), int):
            text.num_hidden_layers = 2
        if getattr(text, "layer_types", None):
            text.layer_types = list(text.layer_types)[:2]
    except (AttributeError, NotImplementedError, ValueError):  # a family that derives these: its defaults
        return type(config)()
    return config
