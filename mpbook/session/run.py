"""A strategy run on the client: the model resolved once, the prompts encoded, the layout and
memory checked before any engine works, one call to the engines, their outputs merged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MpbookError, RankError
from ..layout import STRATEGIES, Layout
from ..options import (
    check_degree, check_dtype, check_max_new_tokens, check_microbatches, check_stage_sizes, check_stop,
    choose_sampling,
)
from ..protocol import DEFAULT_DTYPE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODEL, Request, Stopping
from ..results import RunResult, merge
from .layout_choice import choose_layout, warn_across_hosts
from .memory_check import check_memory, fit_test, free_bytes, smaller_layouts_advice
from .model_info import ModelInfo
from .prompts import EncodedPrompts, check_prompts, encode_prompts

SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")  # generate's, as one dict

if TYPE_CHECKING:
    from ..cluster import Calls, Cluster
    from ..cluster.calls import Follow


@dataclass(frozen=True)
class RunInfo:
    """What a dashboard following a run is told before it starts."""

    strategy: str
    layout: Layout
    prompts: list[str]  # as the cell shows them
    max_new_tokens: int
    decode: Any  # token ids -> text


@dataclass(frozen=True)
class Prepared:
    """A run checked and encoded on the client, before any engine works (Session._prepare)."""

    request: Request
    info: ModelInfo
    encoded: EncodedPrompts
    prompt_tokens: list[int]  # each prompt's length in tokens
    chosen_microbatches: bool  # the micro-batches were left to mpbook (one per pipeline stage)
    microbatches_reason: str = ""  # why this many, for the result's summary (pipelines only)


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
    from ..models.support import padding_problem

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
            from .. import models
            from ..interrupts import interrupt_held

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
        model: str = DEFAULT_MODEL,
        dp: int | None = None,
        pp: int | None = None,
        tp: int | None = None,
        ep: int | None = None,
        microbatches: int | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        dtype: str = DEFAULT_DTYPE,
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
        dense_weights: bool = False,
        follow: Follow | None = None,
    ) -> RunResult:
        """Generate (or, with ``max_new_tokens=0``, run a forward pass) with one layout.

        ``microbatches``: per replica through the pipeline stages; by default one per stage,
        no more than the stages that can compute at once (CPU engines that outnumber their
        cores: :func:`mpbook.parallel.pipeline.default_microbatches`).

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

        ``dense_weights``: CPU engines keep every weight a plain tensor instead of packing the
        Linear weights of a run of 2 rows or more for oneDNN (:mod:`mpbook.models.packed_linear`),
        for a model whose own code reads a Linear's weight (the packed layer's error says so),
        and every product on ``F.linear`` (a one-row run's too: :mod:`mpbook.models.one_row_linear`).
        """
        import time

        began = time.perf_counter()
        prepared = self._prepare(
            prompts, strategy=strategy, model=model, dp=dp, pp=pp, tp=tp, ep=ep, microbatches=microbatches,
            max_new_tokens=max_new_tokens, dtype=dtype, stage_sizes=stage_sizes, attention=attention, plans=plans,
            chat=chat, system=system, sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                     repetition_penalty=repetition_penalty, seed=seed),
            stop=stop, ignore_eos=ignore_eos, stream=stream, track_tensors=track_tensors, compile=compile,
            dense_weights=dense_weights, follow=follow)
        request, info, encoded, prompt_tokens = prepared.request, prepared.info, prepared.encoded, prepared.prompt_tokens
        chosen_microbatches = prepared.chosen_microbatches
        self._check_before_loading(request, info, prompt_tokens)
        _fetch_weights(info, follow)
        _describe_run(follow, strategy, request, encoded, info)
        dispatched = time.perf_counter()
        outputs = self._dispatch(request, info, strategy=strategy, prompt_len=max(prompt_tokens),
                                 default_microbatches=chosen_microbatches, follow=follow)
        self._note_engines_memory(outputs)
        result = merge(
            outputs, strategy=strategy, request=request, prompts=encoded.shown, tokenizer=info.tokenizer,
            prompt_tokens=prompt_tokens, device_type=self.cluster.device_type,
        )
        result.messages = encoded.messages
        result.microbatches_reason = prepared.microbatches_reason
        result.prepare_seconds = dispatched - began
        result.cell_seconds = time.perf_counter() - began
        show = getattr(follow, "show_result", None)
        if show is not None:
            show(result)
        return result

    def request(self, prompts, *, strategy: str, model: str = DEFAULT_MODEL, **options) -> Request:
        """The Request that :meth:`generate` with the same arguments sends the engines, checked
        as it checks it, but not sent: for a caller that runs mpbook's own run on each engine by
        itself (the benchmark's ceiling, :func:`mpbook.bench_peers.measure_own_ceiling`)."""
        import inspect

        bound = inspect.signature(self.generate).bind(prompts, strategy=strategy, model=model, **options)
        bound.apply_defaults()
        args = dict(bound.arguments)
        sampling = {name: args.pop(name) for name in SAMPLING_OPTIONS}
        prepared = self._prepare(args.pop("prompts"), sampling=sampling, **args)
        self._check_before_loading(prepared.request, prepared.info, prepared.prompt_tokens)
        return prepared.request

    # ----------------------------------------------------------------- the steps of a run
    def _prepare(self, prompts, *, strategy, model, dp, pp, tp, ep, microbatches, max_new_tokens, dtype,
                 stage_sizes, attention, plans, chat, system, sampling, stop, ignore_eos, stream, track_tensors,
                 compile, dense_weights, follow) -> Prepared:
        """Every argument checked, the model resolved, the prompts encoded and the layout
        chosen: the run's Request, before any engine works."""
        if isinstance(prompts, str):
            prompts = [prompts]
        _check_strategy(strategy, dp=dp, pp=pp, tp=tp, ep=ep)
        dtype = check_dtype(dtype)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        chosen_microbatches = microbatches is None  # then one per pipeline stage, once the layout is known
        microbatches = 1 if chosen_microbatches else check_microbatches(microbatches)
        stage_sizes = check_stage_sizes(stage_sizes)
        sampling = choose_sampling(**sampling)
        stop_strings = check_stop(stop)
        check_prompts(prompts)
        info = self._resolve(model, follow)
        encoded = encode_prompts(info.tokenizer, prompts, chat=chat, system=system)
        prompt_tokens = [len(ids) for ids in encoded.input_ids]
        layout = self._choose_layout(
            strategy, info.config, prompts=len(prompts), prompt_len=max(prompt_tokens), dp=dp, pp=pp, tp=tp, ep=ep,
            microbatches=microbatches, stage_sizes=stage_sizes, plans=plans, max_new_tokens=max_new_tokens,
            dtype=dtype,
        )
        if stage_sizes is None and layout.pp > 1:
            from ..planner.model_tensors import model_tensors

            # None asked: balanced by the weights a decode step reads (the head counts), the
            # split the planner plans with (mpbook.parallel.pipeline.balanced_stage_sizes).
            stage_sizes = model_tensors(info.config, dtype, plans).stage_sizes(layout.pp)
        reason = "as asked"
        if chosen_microbatches:
            from ..parallel.pipeline import default_microbatches, stages_at_once

            rows, at_once = len(prompts) // layout.dp, stages_at_once(layout, self.cluster.ranks_at_once)
            microbatches = default_microbatches(layout.pp, rows, at_once=at_once)
            if microbatches < min(layout.pp, rows):
                reason = (f"the default: {at_once} of the {layout.pp} stages can compute at once on these engines' "
                          "cores; a micro-batch more would only take turns on one")
            else:
                reason = "the default: one per stage" + (", as the prompts allow" if rows < layout.pp else "")
        request = Request(
            model=str(model), layout=layout, input_ids=encoded.input_ids, max_new_tokens=max_new_tokens,
            pad_token_id=info.tokenizer.pad_token_id, microbatches=microbatches, dtype=dtype,
            stage_sizes=stage_sizes, attention=attention, plans=plans, sampling=sampling,
            stopping=Stopping(max_new_tokens=max_new_tokens, eos_token_ids=info.eos_token_ids,
                              stop_strings=stop_strings, ignore_eos=bool(ignore_eos)),
            track_tensors=track_tensors, stream=stream, compile=bool(compile), dense_weights=bool(dense_weights),
        )
        return Prepared(request, info, encoded, prompt_tokens, chosen_microbatches,
                        reason if layout.pp > 1 else "")

    def _resolve(self, model: str, follow: Follow | None) -> ModelInfo:
        """The model, resolved once per kernel. The dashboard is on screen from here, saying
        what the client does before the engines are called (a kernel's first model takes
        seconds: transformers and its tokenizer)."""
        resolving = str(model) not in self.models
        _preparing(follow, f"resolving the model {model}" if resolving else "tokenizing, checking the layout and memory")
        info = self.model(model)
        if resolving:
            _preparing(follow, "tokenizing, checking the layout and memory")
        return info

    def _choose_layout(self, strategy: str, config, *, prompts: int, prompt_len: int, dp, pp, tp, ep,
                       microbatches: int, stage_sizes, plans, max_new_tokens: int, dtype: str) -> Layout:
        """The layout checked against the model and the prompts as well as the engines, so
        that every problem is said at once and the advice is only what would run (and fit)."""
        cluster = self.cluster
        layout = choose_layout(
            strategy, cluster.world_size, dp=dp, pp=pp, tp=tp, ep=ep, config=config, prompts=prompts,
            microbatches=microbatches, stage_sizes=stage_sizes, plans=plans, cpu=cluster.device_type == "cpu",
            attached=not cluster.owned,
            fits=fit_test(cluster, config, plans=plans, prompts=prompts, prompt_len=prompt_len,
                          max_new_tokens=max_new_tokens, dtype=dtype, microbatches=microbatches,
                          stage_sizes=stage_sizes),
        )
        warn_across_hosts(cluster, layout)
        return layout

    def _check_before_loading(self, request: Request, info: ModelInfo, prompt_tokens: list[int]) -> None:
        """What the layout's check leaves: the context, the padding, the memory, the dtype."""
        check_request(request, config=info.config, prompt_tokens=prompt_tokens)
        check_memory(self.cluster, request, config=info.config, prompt_len=max(prompt_tokens))
        if self.cluster.device_type == "cuda" and request.dtype == "bfloat16":
            if self._bf16 is None:
                self._bf16 = self.calls.apply(_bf16_supported, ranks=[0], stream=False, what="checking the dtype")[0]
            if not self._bf16:
                raise MpbookError("--dtype bfloat16: these GPUs do not support it; use float16 or float32")

    def _dispatch(self, request: Request, info: ModelInfo, *, strategy: str, prompt_len: int,
                  default_microbatches: bool, follow: Follow | None) -> list:
        """One call to the engines; a device that ran out of memory is named, with the
        layouts that need less."""
        from ..engine import decode  # sent to the engines; imports torch, so not before it is needed

        try:
            return self.calls.apply(decode.run, request, what=f"the {strategy} run", follow=follow)
        except RankError as exc:
            oom = [f for f in exc.failures if f.ename == "DeviceOutOfMemory"]
            if not oom:
                raise
            also = [f.rank for f in oom[1:]]
            where = f" (rank{'s' if len(also) > 1 else ''} {', '.join(map(str, also))} too)" if also else ""
            advice = smaller_layouts_advice(
                info.config, request, engines=self.cluster.world_size, free=free_bytes(self.cluster),
                prompt_len=prompt_len, default_microbatches=default_microbatches,
                ranks_at_once=self.cluster.ranks_at_once)
            raise MpbookError(f"{oom[0].evalue}{where}; {advice}") from None

    def _note_engines_memory(self, outputs) -> None:
        """What the engines hold and have free now, for the next cell's memory check (no extra call)."""
        import dataclasses

        cluster = self.cluster
        cluster.engines = [
            dataclasses.replace(e, memory_free_bytes=o.memory_free_bytes, model_bytes=o.weight_bytes)
            for e, o in zip(cluster.engines, outputs)
        ]


def _check_strategy(strategy: str, *, dp, pp, tp, ep) -> None:
    if strategy not in STRATEGIES:
        raise MpbookError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    for dim, degree in (("dp", dp), ("pp", pp), ("tp", tp), ("ep", ep)):
        check_degree(dim, degree)


def _fetch_weights(info: ModelInfo, follow) -> None:
    """Only now: a run that cannot work downloads nothing large."""
    if info.from_hub and not info.weights_fetched:
        _preparing(follow, f"fetching the weights of {info.name} from the hub (or its cache)")
    info.fetch_weights()


def _describe_run(follow, strategy: str, request: Request, encoded: EncodedPrompts, info: ModelInfo) -> None:
    describe = getattr(follow, "describe_run", None)
    if describe is not None:
        describe(RunInfo(strategy=strategy, layout=request.layout, prompts=encoded.shown,
                         max_new_tokens=request.max_new_tokens,
                         decode=lambda ids: info.tokenizer.decode(ids, skip_special_tokens=True)))


def _preparing(follow, note: str) -> None:
    """Tell the dashboards following the run what the client is doing before it calls the engines."""
    preparing = getattr(follow, "preparing", None)
    if preparing is not None:
        preparing(note)


def _bf16_supported(state) -> bool:
    import torch

    return torch.cuda.is_bf16_supported()

