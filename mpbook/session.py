"""Client side of inference: choose and check the layout, resolve the model once, dispatch.

Every check here runs before any engine does work, and each error names the numbers and the
valid choices. A model is resolved once per session (its folder, config and tokenizer are
kept), so a cell on a model already loaded costs the client only its own work. The engines
then load their part of the model (kept for the next run with the same model and layout) and
run :func:`mpbook.engine.decode.run`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import MpbookError, RankError
from .layout import DIMS, OWN_DIM, STRATEGIES, Layout
from .options import (
    check_degree, check_dtype, check_max_new_tokens, check_microbatches, check_repetition_penalty, check_seed,
    check_stage_sizes, check_stop, check_temperature, check_top_k, check_top_p,
)
from .parallel.data import replica_rows
from .protocol import Request, Sampling, Stopping
from .results import RunResult, merge

if TYPE_CHECKING:
    from .cluster import Calls, Cluster
    from .cluster.calls import Follow

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

        from . import models

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
            from . import models

            models.resolve(self.name)
            self.weights_fetched = True

    @property
    def from_hub(self) -> bool:
        """A hub id (its weights come from the hub's cache), not a preset or a local folder."""
        from pathlib import Path

        from .models.presets import PRESETS

        return self.name not in PRESETS and not Path(self.name).expanduser().is_dir()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


@dataclass(frozen=True)
class EncodedPrompts:
    """The prompts as the engines get them, and as the cell shows them."""

    input_ids: tuple[tuple[int, ...], ...]
    shown: list[str]  # what the printout shows of each prompt: the user's line, not the template
    messages: list[list[dict]] | None  # the chat messages of each prompt, with the chat template


def encode_prompts(tokenizer, prompts: Sequence, *, chat: bool | None = None, system: str | None = None) -> EncodedPrompts:
    """Token ids of each prompt: the text as it is, or (chat) the user's message, after an
    optional system message, through the tokenizer's chat template with the assistant's turn
    opened (``add_generation_prompt=True``).

    ``chat=None`` (the default) applies the template when the tokenizer has one: an instruct
    model answers end-of-turn at once to a prompt without its template. A prompt may also be
    a list of messages ({"role", "content"} dicts), which always goes through the template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    listed = [p for p in prompts if not isinstance(p, str)]
    if chat is False and listed:
        raise MpbookError("--no-chat: the prompts include message lists, which need the chat template; leave out --no-chat")
    use_chat = has_template if chat is None else chat
    if (use_chat or listed) and not has_template:
        what = "--chat" if chat else "a prompt given as a list of messages"
        raise MpbookError(
            f"{what}: this model's tokenizer has no chat template; give plain prompts (--no-chat) "
            "or use an instruct model that ships one"
        )
    if system is not None and not (use_chat or listed):
        raise MpbookError("--system: a system message needs the chat template; "
                          + ("leave out --no-chat" if has_template else "this model's tokenizer has no chat template"))
    if not (use_chat or listed):
        return EncodedPrompts(tuple(tuple(ids) for ids in tokenizer(list(prompts))["input_ids"]), list(prompts), None)
    messages = []
    for i, prompt in enumerate(prompts):
        turn = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _checked_messages(i, prompt)
        if system is not None and turn[0]["role"] != "system":
            turn = [{"role": "system", "content": system}, *turn]
        messages.append(turn)
    ids = tuple(
        tuple(tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=False))
        for turn in messages
    )
    shown = [p if isinstance(p, str) else _last_user_line(p) for p in prompts]
    return EncodedPrompts(ids, shown, messages)


def _checked_messages(index: int, messages) -> list[dict]:
    ok = isinstance(messages, (list, tuple)) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise MpbookError(
            f"prompt {index}: give a str, or a list of messages like "
            "[{'role': 'user', 'content': 'Hi'}]"
        )
    return [dict(m) for m in messages]


def _last_user_line(messages) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else str(messages[-1].get("content", ""))


@dataclass(frozen=True)
class RunInfo:
    """What a dashboard following a run is told before it starts."""

    strategy: str
    layout: Layout
    prompts: list[str]  # as the cell shows them
    max_new_tokens: int
    decode: Any  # token ids -> text


def choose_sampling(*, temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed=None) -> Sampling:
    """Greedy unless a temperature, top-k or top-p is given (``temperature=0`` is greedy, as
    in vLLM); the options left out are off (not transformers' fallback of top_k=50). A
    sampled run without a seed gets a random one, kept in the result so it can be rerun."""
    temperature = None if temperature is None else check_temperature(temperature)
    top_k = None if top_k is None else check_top_k(top_k)
    top_p = None if top_p is None else check_top_p(top_p)
    penalty = 1.0 if repetition_penalty is None else check_repetition_penalty(repetition_penalty)
    seed = check_seed(seed)
    sample = any(v is not None for v in (temperature, top_k, top_p)) and temperature != 0
    if not sample:
        return Sampling(repetition_penalty=penalty, seed=seed)
    if seed is None:
        import secrets

        seed = secrets.randbits(32)
    return Sampling(temperature=temperature if temperature is not None else 1.0, top_k=top_k or 0,
                    top_p=top_p if top_p is not None else 1.0, repetition_penalty=penalty, seed=seed, do_sample=True)


def _warn_across_hosts(cluster, layout: Layout) -> None:
    """One line when a tensor or expert group of ``layout`` spans hosts (it runs, slowly)."""
    import sys

    warning = getattr(cluster, "layout_warning", lambda layout: None)(layout)
    if warning:
        print(warning, file=sys.stderr)


def choose_layout(
    strategy: str,
    engines: int,
    *,
    dp: int | None = None,
    pp: int | None = None,
    tp: int | None = None,
    ep: int | None = None,
    config=None,
    prompts: int | None = None,
    microbatches: int = 1,
    stage_sizes: Sequence[int] | None = None,
    plans: dict | None = None,
    cpu: bool = False,
    attached: bool = False,
    fits: Callable[[Layout], bool | None] | None = None,
) -> Layout:
    """Degrees for ``strategy`` on ``engines`` engines: the strategy's own degree takes
    whatever the given ones leave (``tensor --pp 2`` on 4 engines is tp=2 x pp=2).

    Given the model's ``config`` and the number of ``prompts``, every problem is found before
    any work and said at once: the model's limits (stages, heads, KV heads, experts), then
    the prompts (a replica without one; more micro-batches than a replica's prompts), then
    the engine count. The error ends with the layouts of these engines that this model and
    these prompts allow, checked as the request itself is (and, where ``fits`` says, that fit
    in memory), and, when the model takes the layout as asked, what else it needs (more
    prompts; as many engines, started with a command that exists: ``cpu`` and ``attached``
    say which)."""
    if strategy not in STRATEGIES:
        raise MpbookError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    given = {dim: check_degree(dim, value) for dim, value in (("dp", dp), ("pp", pp), ("ep", ep), ("tp", tp))}
    own = OWN_DIM[strategy]
    others = math.prod(v for k, v in given.items() if k != own and v is not None)
    degrees = dict(given)
    divides = given[own] is not None or engines % others == 0
    if given[own] is None:
        degrees[own] = engines // others if divides else 1  # (1: the model's check of the others)
    layout = Layout(**{k: (v if v is not None else 1) for k, v in degrees.items()})

    from .models.support import layout_problems

    model = [] if config is None else layout_problems(config, layout, plans, stage_sizes=stage_sizes)
    work = [] if prompts is None else _prompt_problems(layout, prompts, microbatches)
    if not divides:
        shown = " x ".join(f"{k}={v}" for k, v in given.items() if v is not None)
        count = [f"{shown} = {others} does not divide the {engines} engines that are up"]
    elif layout.world_size != engines:
        product = " x ".join(f"{d}={getattr(layout, d)}" for d in DIMS if d != "ep" or layout.ep > 1)
        count = [f"{product} = {layout.world_size}, but {engines} engines are up"]
    else:
        count = []
    if not (model or work or count):
        return layout

    advice = [_valid_layouts_advice(strategy, engines, config=config, prompts=prompts, microbatches=microbatches,
                                    stage_sizes=stage_sizes, plans=plans, fits=fits)]
    if not model:  # the model takes the layout as asked: what else it needs
        needs = []
        if work:
            needs.append(f"give at least {layout.dp * microbatches} prompts")
        if count:
            start = start_command(layout.world_size, cpu=cpu, attached=attached)
            needs.append(f"run on {layout.world_size} engines ({start})")
        advice.append(f"or, for {layout}, {' and '.join(needs)}")
    raise MpbookError("; ".join(model + work + count + advice))


def start_command(n: int, *, cpu: bool = False, attached: bool = False) -> str:
    """How to have ``n`` engines instead, in commands that exist (`%mp restart` keeps the count)."""
    if attached:
        return (f"`%mp stop`, then attach to {n} of the cluster's engines: `%mp start --profile PROFILE -n {n}`, "
                f"or Workbench.attach(profile=..., n={n})")
    flag, kwarg = (" --cpu", ", cpu=True") if cpu else ("", "")
    return f"`%mp stop`, then `%mp start -n {n}{flag}`, or Workbench.start({n}{kwarg})"


def _prompt_problems(layout: Layout, prompts: int, microbatches: int) -> list[str]:
    if prompts < layout.dp:
        return [f"{prompts} prompt{'s' if prompts != 1 else ''} for dp={layout.dp} replicas: "
                "every replica needs at least one"]
    smallest = min(len(replica_rows(prompts, layout.dp, r)) for r in range(layout.dp))
    if microbatches > smallest:
        return [f"--microbatches {microbatches}: each replica gets at least {smallest} prompt"
                f"{'s' if smallest != 1 else ''}, so choose microbatches in 1..{smallest} (or give more prompts)"]
    return []


def _valid_layouts_advice(strategy: str, engines: int, *, config, prompts, microbatches, stage_sizes, plans,
                          fits) -> str:
    """The layouts of ``engines`` engines the model and the prompts allow (the strategy's own
    first), those that do not fit in memory left out; or, when there is none, each degree's
    choices."""
    from .planner.suggestions import layouts, valid_layouts, why_invalid
    from .units import divisors

    whom = " and ".join(
        (["this model"] if config is not None else [])
        + ([f"{prompts} prompt{'s' if prompts != 1 else ''}"] if prompts is not None else []))
    whom = f" valid for {whom}" if whom else ""
    where = f"{engines} engine{'s' if engines != 1 else ''}"

    def allowed(micro: int) -> list[Layout]:
        if config is not None:
            return valid_layouts(config, engines, batch=prompts, plans=plans, microbatches=micro,
                                 stage_sizes=stage_sizes)
        return [x for x in layouts(engines) if not (prompts is not None and _prompt_problems(x, prompts, micro))]

    valid = allowed(microbatches)
    if not valid and microbatches > 1 and allowed(1):  # too many micro-batches for any layout
        valid, whom = allowed(1), f"{whom} with --microbatches 1"
        microbatches = 1
    own = OWN_DIM[strategy]
    valid.sort(key=lambda x: getattr(x, own) == 1)  # the strategy asked for first (a stable sort)
    fitting = [x for x in valid if fits is None or fits(x) is not False]
    if stage_sizes and any(x.pp > 1 and x.pp != len(stage_sizes) for x in fitting):
        whom += f" (those with pp other than {len(stage_sizes)} without --stages)"
    if fitting:
        return f"layouts of {where}{whom}: {'; '.join(map(str, fitting))}"
    if valid:
        return (f"the layouts of {where}{whom} ({'; '.join(map(str, valid))}) would not fit in the "
                "engines' memory: use more devices, a smaller dtype, fewer prompts or fewer new tokens")
    if config is None:
        return f"no layout of {where}{whom}"
    choices = []
    for dim in DIMS:
        ok = [d for d in divisors(engines)
              if why_invalid(config, Layout(**{dim: d}), prompts, plans=plans, microbatches=microbatches) is None]
        if dim != "ep" or len(ok) > 1:
            choices.append(f"{dim} in {{{', '.join(map(str, ok))}}}")
    return f"no layout of {where} is{whom} (of the degrees that divide {engines}: {', '.join(choices)})"


def check_prompts(prompts: Sequence) -> None:
    """Something to tokenize: at least one prompt, none of them empty (a prompt is a str or
    a list of chat messages)."""
    if not prompts:
        raise MpbookError("no prompts: write one prompt per line in the cell, or pass --prompts VARIABLE")
    for i, p in enumerate(prompts):
        if isinstance(p, (list, tuple)) and p:
            continue
        if not isinstance(p, str) or not p.strip():
            raise MpbookError(f"prompt {i} is empty; every prompt needs at least one token")


def check_request(request: Request, *, config, prompt_tokens: list[int]) -> None:
    """What the layout's check (:func:`choose_layout`) leaves: each prompt and its new tokens
    within the model's context, and left padding only for a model that reads positions.
    ``prompt_tokens``: each prompt's length in tokens."""
    context = getattr(config, "max_position_embeddings", None)
    if context:
        for i, length in enumerate(prompt_tokens):
            if length + request.max_new_tokens > context:
                raise MpbookError(
                    f"prompt {i} has {length} tokens + {request.max_new_tokens} new = "
                    f"{length + request.max_new_tokens}, beyond the model's context of {context}; "
                    f"shorten it or lower --max-new-tokens"
                )
    from .models.support import padding_problem

    problem = padding_problem(config, prompt_tokens)
    if problem:
        raise MpbookError(problem)


class Session:
    """Strategy runs on one cluster, with the models this kernel has resolved kept."""

    def __init__(self, cluster: Cluster, calls: Calls):
        self.cluster = cluster
        self.calls = calls
        self.models: dict[str, ModelInfo] = {}
        self._bf16: bool | None = None

    def model(self, name: str) -> ModelInfo:
        """Resolve ``name`` once: its folder, config and tokenizer (padding on the left)."""
        key = str(name)
        if key not in self.models:
            from . import models
            from .interrupts import interrupt_held

            # The first model of a kernel imports torch and transformers here, and each
            # model its family's code: an interrupt waits until they are in (see interrupts).
            with interrupt_held():
                info = ModelInfo.load(key)
                models.causal_lm_class(info.config)
            self.models[key] = info
        return self.models[key]

    def generate(
        self,
        prompts: Sequence | str,
        *,
        strategy: str,
        model: str = "tiny",
        dp: int | None = None,
        pp: int | None = None,
        tp: int | None = None,
        ep: int | None = None,
        microbatches: int | None = None,
        max_new_tokens: int = 32,
        dtype: str = "float32",
        stage_sizes: Sequence[int] | None = None,
        attention: str | None = None,
        plans: dict | None = None,
        chat: bool | None = None,
        system: str | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        ignore_eos: bool = False,
        stream: bool = True,
        track_tensors: bool = False,
        compile: bool = False,
        follow: Follow | None = None,
    ) -> RunResult:
        """Generate (or, with ``max_new_tokens=0``, run a forward pass) with one layout.

        ``microbatches``: per replica through the pipeline stages; by default one per stage
        (:func:`mpbook.parallel.pipeline.default_microbatches`).

        Prompts: a str, or a list of str or of chat message lists. ``chat``: None (default)
        applies the tokenizer's chat template when it has one, True requires it, False sends
        the text as it is; ``system`` adds a system message. Greedy by default; a
        ``temperature``, ``top_k`` or ``top_p`` samples (transformers' semantics; each off
        unless given), reproducibly per prompt from ``seed`` (a random one if not given,
        kept in the result). Generation stops when every row has produced end-of-sequence
        (the model's generation config) or one of the ``stop`` strings, or at
        ``max_new_tokens``; ``ignore_eos`` runs every row to the cap (benchmarks).

        ``compile``: a static KV cache and a ``torch.compile``'d decode step
        (:mod:`mpbook.engine.compiled`): compiled once per shape before the prefill (the
        result's ``compile_seconds``), reused by later cells of the same shape.
        """
        import time

        began = time.perf_counter()
        if isinstance(prompts, str):
            prompts = [prompts]
        cluster = self.cluster
        if strategy not in STRATEGIES:
            raise MpbookError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        for dim, degree in (("dp", dp), ("pp", pp), ("tp", tp), ("ep", ep)):
            check_degree(dim, degree)
        dtype = check_dtype(dtype)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        chosen_microbatches = microbatches is None  # then one per pipeline stage, once the layout is known
        microbatches = 1 if chosen_microbatches else check_microbatches(microbatches)
        stage_sizes = check_stage_sizes(stage_sizes)
        sampling = choose_sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, seed=seed)
        stop_strings = check_stop(stop)
        check_prompts(prompts)
        # The dashboard is on screen from here, saying what the client does before the engines
        # are called (a kernel's first model takes seconds: transformers and its tokenizer).
        resolving = str(model) not in self.models
        _preparing(follow, f"resolving the model {model}" if resolving else "tokenizing, checking the layout and memory")
        info = self.model(model)
        if resolving:
            _preparing(follow, "tokenizing, checking the layout and memory")
        encoded = encode_prompts(info.tokenizer, prompts, chat=chat, system=system)
        prompt_tokens = [len(ids) for ids in encoded.input_ids]
        # The layout is checked against the model and the prompts as well as the engines, so
        # that every problem is said at once and the advice is only what would run.
        layout = choose_layout(
            strategy, cluster.world_size, dp=dp, pp=pp, tp=tp, ep=ep, config=info.config, prompts=len(prompts),
            microbatches=microbatches, stage_sizes=stage_sizes, plans=plans, cpu=cluster.device_type == "cpu",
            attached=not cluster.owned,
            fits=self._fit_test(info.config, plans=plans, prompts=len(prompts), prompt_len=max(prompt_tokens),
                                max_new_tokens=max_new_tokens, dtype=dtype, microbatches=microbatches,
                                stage_sizes=stage_sizes),
        )
        _warn_across_hosts(cluster, layout)
        if chosen_microbatches:
            from .parallel.pipeline import default_microbatches

            microbatches = default_microbatches(layout.pp, len(prompts) // layout.dp)
        request = Request(
            model=str(model),
            layout=layout,
            input_ids=encoded.input_ids,
            max_new_tokens=max_new_tokens,
            pad_token_id=info.tokenizer.pad_token_id,
            microbatches=microbatches,
            dtype=dtype,
            stage_sizes=stage_sizes,
            attention=attention,
            plans=plans,
            sampling=sampling,
            stopping=Stopping(max_new_tokens=max_new_tokens, eos_token_ids=info.eos_token_ids,
                              stop_strings=stop_strings, ignore_eos=bool(ignore_eos)),
            track_tensors=track_tensors,
            stream=stream,
            compile=bool(compile),
        )
        check_request(request, config=info.config, prompt_tokens=prompt_tokens)
        self.check_memory(request, config=info.config, prompt_len=max(prompt_tokens))
        if cluster.device_type == "cuda" and dtype == "bfloat16":
            if self._bf16 is None:
                self._bf16 = self.calls.apply(_bf16_supported, ranks=[0], stream=False, what="checking the dtype")[0]
            if not self._bf16:
                raise MpbookError("--dtype bfloat16: these GPUs do not support it; use float16 or float32")
        if info.from_hub and not info.weights_fetched:
            _preparing(follow, f"fetching the weights of {model} from the hub (or its cache)")
        info.fetch_weights()  # only now: a run that cannot work downloads nothing large
        describe = getattr(follow, "describe_run", None)
        if describe is not None:
            describe(RunInfo(strategy=strategy, layout=layout, prompts=encoded.shown, max_new_tokens=max_new_tokens,
                             decode=lambda ids: info.tokenizer.decode(ids, skip_special_tokens=True)))
        from .engine import decode  # sent to the engines; imports torch, so not before it is needed

        dispatched = time.perf_counter()
        try:
            outputs = self.calls.apply(decode.run, request, what=f"the {strategy} run", follow=follow)
        except RankError as exc:
            oom = [f for f in exc.failures if f.ename == "DeviceOutOfMemory"]
            if not oom:
                raise
            also = [f.rank for f in oom[1:]]
            where = f" (rank{'s' if len(also) > 1 else ''} {', '.join(map(str, also))} too)" if also else ""
            advice = smaller_layouts_advice(
                info.config, request, engines=cluster.world_size, free=self._free_bytes(),
                prompt_len=max(prompt_tokens), default_microbatches=chosen_microbatches)
            raise MpbookError(f"{oom[0].evalue}{where}; {advice}") from None
        import dataclasses

        # What the engines hold and have free now, for the next cell's memory check (no extra call).
        cluster.engines = [
            dataclasses.replace(e, memory_free_bytes=o.memory_free_bytes, model_bytes=o.weight_bytes)
            for e, o in zip(cluster.engines, outputs)
        ]
        result = merge(
            outputs, strategy=strategy, request=request, prompts=encoded.shown, tokenizer=info.tokenizer,
            prompt_tokens=prompt_tokens, device_type=cluster.device_type,
        )
        result.messages = encoded.messages
        result.prepare_seconds = dispatched - began
        result.cell_seconds = time.perf_counter() - began
        show = getattr(follow, "show_result", None)
        if show is not None:
            show(result)
        return result

    def check_memory(self, request: Request, *, config, prompt_len: int) -> None:
        """Ask the planner whether every rank fits its device before anything loads; if not,
        name the rank, the bytes it needs and has, and the layouts that would fit."""
        from .models import support
        from .planner import plan

        if "pipeline" not in support.supported_strategies(config, request.plans):
            # A model the planner cannot cut into parts is not predicted (a device
            # out-of-memory on an engine is still reported with its rank and bytes).
            return
        cluster = self.cluster
        free = self._free_bytes()
        layout = request.layout
        predicted = plan(
            config, dp=layout.dp, pp=layout.pp, tp=layout.tp, ep=layout.ep, plans=request.plans,
            batch=len(request.input_ids), prompt_len=prompt_len,
            max_new_tokens=request.max_new_tokens, dtype=request.dtype, microbatches=request.microbatches,
            stage_sizes=request.stage_sizes, device_memory_bytes=free, suggestions=False,
        )
        if predicted.fits:
            return
        from .units import format_bytes

        worst = max((r for r in predicted.ranks if not r.fits), key=lambda r: r.total)
        fitting = [str(s.layout) for s in predicted.suggest() if s.fits]
        world = cluster.world_size
        where = "shared by the engines on this host" if cluster.device_type == "cpu" else "free on its device"
        advice = (
            f"layouts that fit on {world} engines: {'; '.join(fitting)}" if fitting
            else f"no layout of {world} engines fits: use more devices, a smaller dtype, fewer prompts or fewer new tokens"
        )
        gib = lambda n: format_bytes(n, unit="GiB")  # noqa: E731
        raise MpbookError(
            f"out of memory (predicted): rank {worst.rank} needs {gib(worst.total)} (weights {gib(worst.weights)} "
            f"+ KV cache {gib(worst.kv_cache)} + activations {gib(worst.activations)}) but has "
            f"{gib(free[worst.rank])} {where}; {advice}"
        )

    def _free_bytes(self) -> list[int]:
        """The bytes each rank may take on its device."""
        cluster = self.cluster
        engines = cluster.engines
        if cluster.device_type == "cuda":
            # A model already loaded on an engine is freed before another loads (or reused as is).
            return [e.memory_free_bytes + e.model_bytes for e in engines]
        # CPU engines on one host share its memory (each reports the host's available
        # memory): each may count on an equal share of it, and of what its models free.
        hosts = [e.host for e in engines]
        pool = {h: next(e.memory_free_bytes for e in engines if e.host == h)
                + sum(e.model_bytes for e in engines if e.host == h) for h in set(hosts)}
        return [pool[h] // hosts.count(h) for h in hosts]

    def _fit_test(self, config, *, plans, prompts: int, prompt_len: int, max_new_tokens: int, dtype: str,
                  microbatches: int, stage_sizes) -> Callable[[Layout], bool | None] | None:
        """Whether a layout of these engines would fit their memory, as the planner predicts
        (None where it cannot predict): so that the layouts an error suggests also fit."""
        from .models import support

        if "pipeline" not in support.supported_strategies(config, plans):
            return None  # a model the planner cannot cut into parts (see check_memory)

        def fits(layout: Layout) -> bool | None:
            from .planner import plan

            try:
                return plan(
                    config, dp=layout.dp, pp=layout.pp, tp=layout.tp, ep=layout.ep, plans=plans, batch=prompts,
                    prompt_len=prompt_len, max_new_tokens=max_new_tokens, dtype=dtype, microbatches=microbatches,
                    stage_sizes=stage_sizes if stage_sizes and len(stage_sizes) == layout.pp > 1 else None,
                    device_memory_bytes=self._free_bytes(),
                    suggestions=False,
                ).fits
            except MpbookError:
                return None

        return fits


def smaller_layouts_advice(config, request: Request, *, engines: int, free: Sequence[int], prompt_len: int,
                           default_microbatches: bool = False) -> str:
    """What to try after ``request``'s layout ran out of memory on a device although the
    planner predicted it would fit (``free``: each rank's bytes, as :meth:`Session._free_bytes`
    says them): the layouts of these ``engines`` that the planner predicts need less memory
    per rank than the one that failed (more stages, more tp, fewer rows per replica), each
    valid for the model and the prompts and predicted to fit the engines, least memory first,
    with their predicted peaks; or, where none needs less, what else would.

    ``default_microbatches``: the run took the default micro-batches (one per stage), so each
    layout is planned with its own default; else with the request's."""
    from .models import support
    from .parallel.pipeline import default_microbatches as one_per_stage
    from .planner import plan
    from .planner.suggestions import valid_layouts
    from .units import format_bytes

    generic = "fewer prompts or new tokens per run, or more engines, need less memory per device"
    if "pipeline" not in support.supported_strategies(config, request.plans):
        return generic  # a model the planner cannot cut into parts: it predicts nothing
    batch = len(request.input_ids)

    def peak(layout: Layout) -> int | None:
        """The largest per-rank total the planner predicts for ``layout``; None where it
        predicts the layout does not fit the engines (or cannot plan it)."""
        micro = one_per_stage(layout.pp, batch // layout.dp) if default_microbatches else request.microbatches
        stages = request.stage_sizes if request.stage_sizes and len(request.stage_sizes) == layout.pp > 1 else None
        try:
            planned = plan(
                config, dp=layout.dp, pp=layout.pp, tp=layout.tp, ep=layout.ep, plans=request.plans, batch=batch,
                prompt_len=prompt_len, max_new_tokens=request.max_new_tokens, dtype=request.dtype, microbatches=micro,
                stage_sizes=stages, device_memory_bytes=list(free), suggestions=False,
            )
        except MpbookError:
            return None
        return planned.peak_bytes if planned.fits or layout == request.layout else None

    need = peak(request.layout)
    if need is None:
        return generic
    layouts = valid_layouts(config, engines, batch=batch, plans=request.plans,
                            microbatches=1 if default_microbatches else request.microbatches,
                            stage_sizes=request.stage_sizes)
    smaller = sorted(
        ((x, p) for x in layouts if x != request.layout and (p := peak(x)) is not None and p < need),
        key=lambda item: (item[1], item[0].tp, item[0].pp),
    )
    than = f"than {request.layout} ({format_bytes(need)} predicted)"
    if not smaller:
        return (f"no layout of {engines} engines needs less memory per rank {than}: use more devices, "
                "a smaller dtype, fewer prompts or fewer new tokens")
    listed = "; ".join(f"{x} ({format_bytes(p)})" for x, p in smaller)
    return f"layouts of {engines} engines that need less memory per rank {than}: {listed}"


def _preparing(follow, note: str) -> None:
    """Tell the dashboards following the run what the client is doing before it calls the engines."""
    preparing = getattr(follow, "preparing", None)
    if preparing is not None:
        preparing(note)


def _bf16_supported(state) -> bool:
    import torch

    return torch.cuda.is_bf16_supported()

