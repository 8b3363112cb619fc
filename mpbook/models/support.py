"""Which strategies a model supports, and whether a layout can split it: checked on the client
before any engine works, each error one line with the model's own numbers and the valid
choices. Also the README's families x strategies table, produced from what mpbook reads."""

from __future__ import annotations

import contextlib

from ..errors import MpbookError
from ..layout import OWN_DIM, STRATEGIES
from ..units import divisors
from .structure import EXPERT_COUNTS, PIPELINE_SOURCES, NoPipeline, check_plans, structure


# Layouts `python -m mpbook conformance` measured failing (transformers 5.24) for a cause in the
# family's own code or checkpoint format that mpbook does not follow: refused before any engine
# works, each with its cause and the measured error. A new transformers may change them: the
# refusal names the command that measures them again.
MEASURED_REFUSALS: dict[tuple[str, str], str] = {
    ("cpmant", "data"): "it prepends its learned prompt tokens inside its forward, so its cache holds more positions "
                        "than the attention mask mpbook's decode loop passes (measured: 53 keys against a mask of 33)",
    ("minimax", "data"): "it keeps a cache class of its own (MiniMaxCache), which mpbook's decode loop does not build",
    ("doge", "tensor"): "its plan splits dt_proj by rows, but its attention needs every head's dynamic mask on every "
                        "rank (measured: a mask of 4 heads against 2)",
    ("hy_v4", "pipeline"): "it widens its hidden states into hyper-connection streams before its first layer, so a "
                           "later stage's input is not what the stage before it sends",
    ("deepseek_v4", "pipeline"): "it widens its hidden states into hyper-connection streams before its first layer, so "
                                 "a later stage's input is not what the stage before it sends",
    ("nanochat", "pipeline"): "one norm module runs before and after its layers, so a stage cannot drop the final "
                              "norm without the first",
    ("deepseek_v4", "tensor"): "its checkpoint is saved under names its loading converts (model.norm.weight is not "
                               "found as saved), which mpbook's per-rank reader does not follow",
    ("deepseek_v4", "expert"): "its checkpoint is saved under names its loading converts (model.norm.weight is not "
                               "found as saved), which mpbook's per-rank reader does not follow",
    ("sarvam_moe", "pipeline"): "its checkpoint fuses tensors that its loading splits by the model's own shapes "
                                "(transformers' Split), which mpbook's per-rank reader does not do",
    ("sarvam_moe", "tensor"): "its checkpoint fuses tensors that its loading splits by the model's own shapes "
                              "(transformers' Split), which mpbook's per-rank reader does not do",
    ("sarvam_moe", "expert"): "its checkpoint fuses tensors that its loading splits by the model's own shapes "
                              "(transformers' Split), which mpbook's per-rank reader does not do",
    ("longcat_flash", "pipeline"): "measured failing (a stage's run raised a size mismatch and its peer timed out)",
    ("longcat_flash", "tensor"): "measured failing (a mask of 22 positions against 44 keys in its split attention)",
    ("longcat_flash", "expert"): "measured failing (a mask of 22 positions against 44 keys in its attention, "
                                 "with transformers 5.25's expert plan)",
    **{("param2moe", kind): "its checkpoint fuses tensors that its loading splits by the model's own shapes "
                            "(transformers' Split), which mpbook's per-rank reader does not do"
       for kind in ("pipeline", "tensor", "expert")},
    ("youtu", "pipeline"): "measured giving other logits than one device (by 1.7)",
    ("youtu", "tensor"): "measured giving other logits than one device (by 1.7)",
}
# Families whose output for a prompt was measured to depend on its batch's left padding (their
# recurrence or compressed attention runs over the padding): prompts of different lengths refused.
PADDING_SENSITIVE: dict[str, str] = {
    "recurrent_gemma": "its recurrent layers run over the left padding (measured: a prompt's logits change by 1.9 "
                       "with its batch)",
    "deepseek_v4": "its compressed attention reads the left padding (measured: a prompt's logits change by 0.85 "
                   "with its batch)",
}
REMEASURE = "`python -m mpbook conformance --types {} --remeasure` measures it again"


@contextlib.contextmanager
def measured_refusals_lifted():
    """The measured refusals above left out for a while (the sweep's ``--remeasure``)."""
    global MEASURED_REFUSALS, PADDING_SENSITIVE
    kept = MEASURED_REFUSALS, PADDING_SENSITIVE
    MEASURED_REFUSALS, PADDING_SENSITIVE = {}, {}
    try:
        yield
    finally:
        MEASURED_REFUSALS, PADDING_SENSITIVE = kept


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _config_plans(config, plans: dict | None) -> tuple[dict, dict, dict]:
    """The config's own (base-relative) tp / pp / ep plans with a user's rules merged in."""
    plans = check_plans(plans)
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

    model_class = causal_lm_class(config)
    if model_class is None:  # not a causal LM transformers knows: let loading say so
        return True
    return "cache" in inspect.signature(model_class.forward).parameters


def causal_lm_class(config):
    """transformers' causal-LM class for ``config`` (importing its family's code), or None
    when transformers has none."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except Exception:  # noqa: BLE001  a config transformers maps to no causal LM
        return None


def positions_from_padding(config) -> bool:
    """Whether the model counts a row's positions from the batch's first column: its forward
    takes no ``position_ids`` and it holds a table of positions (the decoders of BART's family),
    so a left-padded row's positions shift by its padding. (A model with neither, ALiBi's or a
    state-space model's, reads the attention mask instead.)"""
    import inspect

    import torch

    from .structure import meta_model

    model_class = causal_lm_class(config)
    if model_class is None or "position_ids" in inspect.signature(model_class.forward).parameters:
        return False
    model = meta_model(config)
    return any(isinstance(m, torch.nn.Embedding) and "position" in type(m).__name__.lower() for m in model.modules())


def padding_problem(config, prompt_tokens) -> str | None:
    """Why ``config``'s model cannot take these prompts in one batch (None: it can): prompts of
    different lengths are left-padded, and a model that counts positions from the batch's first
    column would see a padded prompt's positions shifted, so its output would depend on the
    batch it ran in."""
    lengths = sorted(set(prompt_tokens))
    if len(lengths) < 2:
        return None
    if config.model_type in PADDING_SENSITIVE:
        return (f"{config.model_type}: {PADDING_SENSITIVE[config.model_type]}, so prompts of different lengths "
                f"({lengths[0]} to {lengths[-1]} tokens) would not give their own outputs; give prompts of one length, "
                f"or one prompt per run; {REMEASURE.format(config.model_type)}")
    if not positions_from_padding(config):
        return None
    return (f"{config.model_type}'s forward takes no position_ids (it counts positions from the batch's first "
            f"column), so the left padding of prompts of different lengths ({lengths[0]} to {lengths[-1]} tokens) "
            "would change their outputs; give prompts of one length, or one prompt per run")


def supported_strategies(config, plans: dict | None = None) -> tuple[str, ...]:
    """The strategies mpbook can run ``config``'s model with: data for every causal LM whose
    forward takes a cache (all but RWKV); for models with a KV cache only (no recurrent state),
    pipeline when a pp plan (the config's or ``plans``') or the module order gives its layers,
    tensor when a tp plan splits its decoder layers with styles mpbook implements, expert when
    an ep plan names its experts."""
    return tuple(s for s in STRATEGIES if why_not(config, s, plans) is None)


def why_not(config, strategy: str, plans: dict | None = None) -> str | None:
    """Why ``strategy`` cannot split ``config``'s model (None: it can), in a few words."""
    tp, pp, ep = _config_plans(config, plans)
    mt = config.model_type
    if not takes_a_cache(config):
        return f"{mt}'s forward takes no cache (it threads a state of its own), which mpbook's decode loop does not carry"
    measured = MEASURED_REFUSALS.get((mt, strategy)) or MEASURED_REFUSALS.get((mt, "data"))
    if measured:
        return f"{mt}: {measured}; {REMEASURE.format(mt)}"
    if strategy == "data":
        return None
    if strategy in OWN_DIM and recurrent_state(config):
        return (f"{mt}'s layers keep a recurrent state (state-space or linear attention), which mpbook's "
                "stages and shards do not carry")
    if strategy == "pipeline":
        try:  # (a pp plan whose modules are not the base model's children, a multimodal one's, is no order)
            s = structure(config, plans)
        except NoPipeline as exc:
            return f"{exc}, so mpbook cannot find its stages"
        except MpbookError as exc:
            return str(exc)
        if s.pp_source not in PIPELINE_SOURCES:
            inside = s.layers.rpartition(".")[0]
            if pp:
                return (f"{mt}'s decoder layers sit inside {inside} (not a child of its base model, where its pp plan "
                        "names modules), so mpbook cannot order its stages")
            return (f"{mt} has no base_model_pp_plan and its decoder layers sit inside {inside} (not a child of its "
                    "base model), so mpbook cannot order its stages")
        return None
    if strategy == "tensor":
        if not any("*" in k for k in tp):
            return f"{mt} has no tensor-parallel plan for its decoder layers (its config carries no base_model_tp_plan)"
        return _unimplemented_style(mt, "tensor", tp)
    if strategy == "expert":
        if not ep:
            return f"{mt} has no expert-parallel plan (its config carries no base_model_ep_plan: not a mixture of experts)"
        return _unimplemented_style(mt, "expert", ep)
    raise MpbookError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def _user_plan_hint(strategy: str) -> str:
    example = {
        "pipeline": "plans={'pp': {'embed_tokens': ..., 'layers': ..., 'norm': ...}} (base_model_pp_plan's format)",
        "tensor": "plans={'tp': {'layers.*.self_attn.q_proj': 'colwise', ...}} (base_model_tp_plan's format)",
        "expert": "plans={'ep': {...}} (base_model_ep_plan's format)",
    }[strategy]
    return f"to split it anyway, pass {example}"


def check_layout(config, layout, plans: dict | None = None, *, stage_sizes=None) -> None:
    """Raise :class:`MpbookError` unless ``layout`` can split ``config``'s model: one line with
    every problem (the model's own numbers and the valid choices of each degree)."""
    problems = layout_problems(config, layout, plans, stage_sizes=stage_sizes)
    if problems:
        raise MpbookError("; ".join(problems))


def layout_problems(config, layout, plans: dict | None = None, *, stage_sizes=None) -> list[str]:
    """Everything about ``layout`` that ``config``'s model does not allow, one clause per degree:
    a strategy the model has no plan for, more stages than layers, a tp that does not divide the
    heads or KV heads, an ep that does not divide the experts. [] when the model takes it.

    (The vocabulary sets no limit: a tp rank whose slice of the vocabulary would be empty still
    takes part in the logits' collectives, see mpbook.parallel.vocab.)"""
    from ..parallel.pipeline import split_layers

    allowed = supported_strategies(config, plans)
    if not allowed:
        return [f"{why_not(config, 'data', plans)}; mpbook cannot run {config.model_type} models"]
    problems = []
    for strategy, dim in OWN_DIM.items():  # data is always allowed here (allowed is not empty)
        degree = getattr(layout, dim)
        if degree > 1 and strategy not in allowed:
            reason = why_not(config, strategy, plans)
            # A plan cannot carry a recurrent state across stages or shards: no hint then.
            hint = "" if recurrent_state(config) else f"; {_user_plan_hint(strategy)}"
            problems.append(
                f"{dim}={degree}: {reason}; {config.model_type} works with {', '.join(allowed)} parallelism{hint}"
            )
    text = _text(config)
    if layout.pp > 1 and "pipeline" in allowed:
        try:
            split_layers(text.num_hidden_layers, layout.pp, stage_sizes)
        except MpbookError as exc:
            problems.append(str(exc))
    if layout.tp > 1 and "tensor" in allowed:
        s = structure(config, plans)
        if s.heads_split_by_tp and (s.heads % layout.tp or s.kv_heads % layout.tp):
            valid = ", ".join(str(d) for d in divisors(s.heads) if s.kv_heads % d == 0)
            if s.heads % layout.tp:
                what = f"the {s.heads} attention heads ({s.kv_heads} KV heads)"
            else:
                what = f"the {s.kv_heads} KV heads ({s.heads} attention heads)"
            problems.append(
                f"tp={layout.tp} does not divide {what} of this {config.model_type} model; choose tp in {{{valid}}}"
            )
    if layout.ep > 1 and "expert" in allowed:
        experts = num_experts(config, plans)
        if experts is None or experts % layout.ep:
            valid = ", ".join(str(d) for d in divisors(experts or 1))
            problems.append(
                f"ep={layout.ep} does not divide the {experts} experts of this {config.model_type} model; "
                f"choose ep in {{{valid}}}"
            )
    return problems


def validate_tp(config, tp: int, plans: dict | None = None) -> None:
    """``tp`` must divide what the model's plan splits by heads; the error names the model's
    numbers and the valid choices (tp alone; :func:`check_layout` checks a whole layout)."""
    from ..layout import Layout

    check_layout(config, Layout(tp=tp), plans)


def num_experts(config, plans: dict | None = None) -> int | None:
    """How many routed experts each MoE layer of ``config``'s model has (None: not a MoE)."""
    text = _text(config)
    for attr in EXPERT_COUNTS:
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return structure(config, plans).num_experts


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


def _unimplemented_style(model_type: str, kind: str, plan: dict[str, str]) -> str | None:
    """The first entry of a ``kind`` ("tensor", "expert") parallel plan whose style mpbook
    does not implement, said as the refusal; None when it implements every one."""
    from ..parallel.tensor import IMPLEMENTED

    for key, style in plan.items():
        if style not in IMPLEMENTED:
            return f"{model_type}'s {kind}-parallel plan gives {key} the style {style!r}, which mpbook does not implement"
    return None
