"""The benchmark's two yardsticks: the machine's ceiling, and transformers' own distributed path.

A layout's tokens/s alone say little; two numbers measured in the same run make them mean
something.

**The ceiling** (``python -m mpbook bench`` measures it with the layouts): the most N engines
of this machine give on this work when they never talk to each other. Every engine generates
its share of the prompts, all from one signal, and the batch is done when the slowest engine
is; against one engine doing every prompt. Measured with two steps: **mpbook's own** (each
engine's share of a data-parallel run, whose ranks send nothing during a run, against the
bench's one-engine cluster; the headline, since it is the step the layouts run) and
**transformers' generate** (the form the ceiling was first defined with; each engine's weights
stored as mpbook's engines store them for the rows it generates, :mod:`mpbook.models.weight_order`:
on huge pages, packed for oneDNN from 2 rows). On a GPU workstation N devices give nearly N x;
CPU engines share one memory bus and a decode step is memory-bound (it reads every weight once
per step), so two CPU engines gain far less, and a layout is shown as a % of the ceiling
rather than of N.

Timed so that noise does not decide it: load and warm up first; then every engine begins
each run on the same wall-clock ticks (the client sends the first, a little in the future,
and the period), with no message between engines; windows of runs alternate together and
alone, A B B A. Runs from one signal are what a layout's run is: its ranks prefill together
and decode together. Engines left to run back to back drift apart, one's prefill (compute)
beside another's decode (memory traffic), and find a gain no batch can: on ``small``, 8 prompts
on 2 CPU engines, that measured 1.16-1.33x where runs from one signal measured 1.05-1.20x, in
the same hour. Pairs timed separately (each its own start) ranged 0.84-1.52x.

**The peer** (``python -m mpbook bench --against transformers``): transformers' own
distributed inference on the same engines, with the same token ids and the same fixed number
of new tokens, interleaved with mpbook's runs of the same layout: data (plain ``generate`` per
replica on its contiguous share, as mpbook splits), tensor
(``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))``) and pipeline
(``DistributedConfig(pp_size=N)``). Both sides are timed on the engines, generation only
(mpbook: its prefill and decode phases; transformers: the ``generate`` call after a barrier, on
the slowest rank). A form that fails to load or run, or whose tokens differ from one device's,
is a row that says ``fails: reason``: its numbers are still shown, never dropped.

What transformers' distributed path needs, read in transformers 5.24 (``distributed/utils.py``
and ``integrations/accelerate.py``):

- the process group: ``_ensure_torch_distributed`` initializes one from RANK, LOCAL_RANK and
  WORLD_SIZE only when none is up, so it takes the engines' default (gloo) group as it is;
- the mesh covers the whole world (``pp * dp_replicate * fsdp * tp == world_size``), so only
  the full degree of each strategy;
- on an accelerator it binds each process to device ``LOCAL_RANK`` (default 0), so on GPU
  engines LOCAL_RANK is set to the engine's own while it loads;
- it hands ``from_pretrained`` a device map, which requires ``accelerate`` (``pip install
  accelerate``, pure Python); without it the load fails alike on every rank, and the row says so.

Fixed length: mpbook's ``ignore_eos`` still chooses end-of-sequence tokens and goes on; here
``generate(..., eos_token_id=[])`` does the same. transformers' ``min_new_tokens`` would not: it
forbids end-of-sequence and so changes the tokens (the ``tiny`` preset chooses one at the 10th
step of the first benchmark prompt); ``eos_token_id=None`` is no better, generate then takes the
model's own.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .protocol import DEFAULT_DTYPE, DEFAULT_MODEL

CACHE_KEY = "bench_peers"  # the peer's models in the engine's cache (dropped when done)
TRANSFORMERS_STEP = "transformers' generate"
OWN_STEP = "mpbook's own step"
KINDS = ("data", "tensor", "pipeline")
DEGREE_OF = {"tensor": "tp_size", "pipeline": "pp_size"}


# --------------------------------------------------------------------------- on the engines
def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _models(state) -> dict:
    return state.cache.setdefault(CACHE_KEY, {})


def plain_model(state, model: str, dtype: str):
    """The whole model with plain transformers, on this engine's device (kept for the run)."""
    key = ("plain", model, dtype)
    models = _models(state)
    if key not in models:
        models[key] = _from_pretrained(state, model, dtype)
    return models[key]


def _from_pretrained(state, model: str, dtype: str):
    from transformers import AutoModelForCausalLM

    from .models import resolve

    lm = AutoModelForCausalLM.from_pretrained(resolve(model), dtype=_dtype(dtype), use_safetensors=True)
    return lm.to(state.device).eval().requires_grad_(False)


def ceiling_model(state, model: str, dtype: str, rows: int):
    """The whole model as an mpbook engine holds it for forwards of ``rows`` rows: plain
    transformers loaded, and on a CPU its weights on huge pages, stored for ``rows`` rows."""
    key = ("ceiling", model, dtype)
    models = _models(state)
    if key not in models:
        from .models import place_on_huge_pages

        lm = _from_pretrained(state, model, dtype)  # a copy of its own: the peer's stays as transformers stores it
        if state.device.type == "cpu":
            place_on_huge_pages(lm)
        models[key] = lm
    lm = models[key]
    if state.device.type == "cpu" and rows:
        from .models import order_weights

        order_weights(lm, rows=rows)
    return lm


def drop_ceiling_model(state) -> None:
    import gc

    for key in [k for k in _models(state) if k[0] == "ceiling"]:
        del _models(state)[key]
    gc.collect()


def drop_models(state) -> None:
    """Let go of every model this module loaded on the engine (their memory is the layouts')."""
    import gc

    state.cache.pop(CACHE_KEY, None)
    gc.collect()


def _batch(state, ids: list[list[int]], pad_id: int) -> dict:
    """Left-padded input ids and their mask, as mpbook pads a batch."""
    import torch

    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return {"input_ids": input_ids.to(state.device), "attention_mask": mask.to(state.device)}


def _generate(lm, batch: dict, new_tokens: int):
    """Greedy ``generate`` of exactly ``new_tokens`` per row (end-of-sequence chosen but not
    stopping, as mpbook's ignore_eos). Returns the new ids, (rows, steps)."""
    import torch

    with torch.inference_mode():
        # eos_token_id=[]: no id ends a row. None would not do: generate takes a None from the
        # model's own generation config.
        out = lm.generate(**batch, do_sample=False, max_new_tokens=new_tokens, eos_token_id=[])
    return out[:, batch["input_ids"].shape[1]:]


def _rows(state, prompts: int, share: bool) -> range:
    """The prompts this engine serves: its contiguous share (as mpbook's data parallel splits
    them), or all of them."""
    from .units import split_evenly

    return split_evenly(prompts, state.world_size)[state.rank] if share else range(prompts)


def ceiling_warm_up(state, *, model: str, dtype: str, ids, pad_id: int, new_tokens: int) -> float:
    """Load the model and run once what the windows will run (first touch, allocator). Returns
    how long rank 0's run of every prompt took (the longest run of a window)."""
    mine = [ids[i] for i in _rows(state, len(ids), share=True)]
    if mine:
        _generate(ceiling_model(state, model, dtype, len(mine)), _batch(state, mine, pad_id), new_tokens)
    if state.rank != 0:
        return 0.0
    lm, batch = ceiling_model(state, model, dtype, len(ids)), _batch(state, ids, pad_id)
    began = time.perf_counter()
    _generate(lm, batch, new_tokens)
    return time.perf_counter() - began


def _ticks(start_at: float, period: float, count: int):
    """Sleep until each of ``count`` wall-clock ticks ``period`` apart from ``start_at``;
    yields how late each run begins (a run that overran its period delays the next)."""
    for k in range(count):
        tick = start_at + k * period
        wait = tick - time.time()
        if wait > 0:
            time.sleep(wait)
        yield max(0.0, time.time() - tick)  # (a sleep ends a little after its time, too)


def ceiling_runs(state, *, model: str, dtype: str, ids, pad_id: int, new_tokens: int, start_at: float,
                 period: float, count: int, share: bool) -> dict:
    """Generate this engine's prompts (its share, or all of them) with transformers at each
    of ``count`` ticks; each run's seconds and new tokens."""
    mine = [ids[i] for i in _rows(state, len(ids), share)]
    lm = ceiling_model(state, model, dtype, len(mine))  # (its weights stored for these rows before the first tick)
    batch = _batch(state, mine, pad_id) if mine else None
    seconds, tokens, starts, late = [], [], [], 0.0
    for lateness in _ticks(start_at, period, count):
        late = max(late, lateness)
        starts.append(time.time())
        began = time.perf_counter()
        new = _generate(lm, batch, new_tokens) if batch is not None else None
        seconds.append(time.perf_counter() - began)
        tokens.append(new.numel() if new is not None else 0)
    return {"rank": state.rank, "rows": len(mine), "seconds": seconds, "tokens": tokens, "starts": starts,
            "late_s": late}


def own_runs(state, *, request, start_at: float, period: float, count: int) -> dict:
    """mpbook's own run of ``request`` (this engine's share of a data-parallel run, or a
    one-engine cluster's every prompt) at each of ``count`` ticks; each run's seconds (its
    prefill and decode, as a layout's run is timed) and new tokens.

    A data-parallel rank's run sends nothing to the others once its model is loaded (a run of
    the whole cluster loads it first), so each engine runs on its own, from the ticks alone."""
    from .engine import decode

    seconds, tokens, starts, late, rows = [], [], [], 0.0, 0
    for lateness in _ticks(start_at, period, count):
        late = max(late, lateness)
        starts.append(time.time())
        out = decode.run(state, request)
        seconds.append(out.phase_seconds.get("prefill", 0.0) + out.phase_seconds.get("decode", 0.0))
        tokens.append(out.new_tokens)
        rows = len(out.rows)
    return {"rank": state.rank, "rows": rows, "seconds": seconds, "tokens": tokens, "starts": starts,
            "late_s": late}


def reference_tokens(state, *, model: str, dtype: str, ids, pad_id: int, new_tokens: int) -> list[list[int]]:
    """One device's tokens: plain ``generate`` of every prompt in one batch on this engine."""
    return _generate(plain_model(state, model, dtype), _batch(state, ids, pad_id), new_tokens).tolist()


@contextmanager
def _local_rank(state):
    """transformers binds an accelerator to device LOCAL_RANK (default 0) while it loads a
    distributed model: say which device this engine is on, for that load only."""
    import os

    before = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = str(state.local_rank)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = before


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "requires `accelerate`" in text:
        return ("transformers' DistributedConfig path needs accelerate (pip install accelerate): "
                "it loads with a device map")
    return f"{type(exc).__name__}: {text}"[:300]


def peer_load(state, *, kind: str, model: str, dtype: str) -> str | None:
    """Load transformers' form of ``kind`` on this engine; None, or why it failed."""
    try:
        if kind == "data":
            plain_model(state, model, dtype)
            return None
        import transformers

        if not hasattr(transformers, "DistributedConfig"):
            return f"transformers {transformers.__version__} has no DistributedConfig"
        from transformers import AutoModelForCausalLM, DistributedConfig

        from .models import resolve

        models = _models(state)
        models.pop(("peer", kind), None)
        with _local_rank(state):
            lm = AutoModelForCausalLM.from_pretrained(
                resolve(model), dtype=_dtype(dtype), use_safetensors=True,
                distributed_config=DistributedConfig(**{DEGREE_OF[kind]: state.world_size}),
            )
        models[("peer", kind)] = lm.eval().requires_grad_(False)
        return None
    except Exception as exc:  # reported as the row's failure, on every rank alike
        return _reason(exc)


def peer_generate(state, *, kind: str, model: str, dtype: str, ids, pad_id: int, new_tokens: int) -> dict:
    """One timed generation of transformers' form of ``kind``: this rank's new tokens and seconds."""
    import torch.distributed as dist

    lm = plain_model(state, model, dtype) if kind == "data" else _models(state)[("peer", kind)]
    rows = _rows(state, len(ids), share=kind == "data")
    batch = _batch(state, [ids[i] for i in rows], pad_id) if len(rows) else None
    # Every rank starts together, as mpbook's ranks start on one request.
    dist.barrier()
    began = time.perf_counter()
    try:
        tokens = _generate(lm, batch, new_tokens).tolist() if batch is not None else []
    except Exception as exc:
        return {"error": _reason(exc)}
    return {"rows": list(rows), "tokens": tokens, "seconds": time.perf_counter() - began}


# --------------------------------------------------------------------------- on the client
def encode(model: str, prompts: list[str], *, chat: bool | None) -> tuple[list[list[int]], int]:
    """The prompts' token ids as mpbook sends them (``chat`` as ``generate``'s), and the pad id."""
    from .models import load_tokenizer
    from .session.prompts import encode_prompts

    tokenizer = load_tokenizer(model)
    encoded = encode_prompts(tokenizer, prompts, chat=chat)
    return [list(row) for row in encoded.input_ids], tokenizer.pad_token_id


def generation_tokens_per_s(result) -> float:
    """A run's new tokens over its generation time: the slowest rank's prefill and decode
    (what transformers' side and the ceiling's windows time). The result's own prefill and
    decode seconds are each the slowest rank's, whose sum may be no rank's."""
    per_rank = [p.get("prefill", 0.0) + p.get("decode", 0.0) for p in result.rank_phase_seconds]
    seconds = max(per_rank) if per_rank else result.prefill_seconds + result.decode_seconds
    return result.new_tokens / seconds if seconds else 0.0


@dataclass(frozen=True)
class Ceiling:
    """N engines generating their shares of a batch from one signal against one engine doing
    the whole batch, run after run."""

    engines: int
    window_s: float
    together_tok_s: list[float]  # per round: the batch's new tokens over the slowest engine's seconds
    alone_tok_s: list[float]  # per round: one engine alone with every prompt
    late_s: float  # the latest any engine began a run after its tick
    per_engine: list[list[dict]] = field(default_factory=list)  # per round: each engine's runs
    step: str = TRANSFORMERS_STEP  # what each engine ran
    runs: int = 0  # runs per window
    # Round k was measured just before round k of the layouts (bench's own ceiling), so a
    # layout's share can be taken round by round, each pair close in time.
    interleaved: bool = False

    @property
    def ratio(self) -> float:
        """The ceiling: median over rounds of together / alone (pairs close in time)."""
        return statistics.median(t / a for t, a in zip(self.together_tok_s, self.alone_tok_s))

    @property
    def together(self) -> float:
        return statistics.median(self.together_tok_s)

    @property
    def alone(self) -> float:
        return statistics.median(self.alone_tok_s)

    def format(self) -> str:
        late = f"; an engine began up to {self.late_s * 1e3:.0f} ms after its tick" if self.late_s > 0.01 else ""
        # Each round's pair, not the medians of each side: those come from different rounds,
        # and their quotient is not the ratio shown.
        rounds = ", ".join(f"{t:,.1f} vs {a:,.1f}" for t, a in zip(self.together_tok_s, self.alone_tok_s))
        return (f"the machine's ceiling with {self.step}: {self.engines} engines, each generating its share of the "
                f"batch from one signal, give {self.ratio:.2f}x the tokens/s of one engine with the whole batch "
                f"(the median of {len(self.alone_tok_s)} rounds of {self.runs} runs; together vs alone, tok/s: "
                f"{rounds}{late})")

    def payload(self) -> dict:
        return {"step": self.step, "engines": self.engines, "window_s": self.window_s, "runs": self.runs,
                "ratio": self.ratio, "together_tok_s": self.together_tok_s, "alone_tok_s": self.alone_tok_s,
                "late_s": self.late_s}


def measure_ceiling(wb, *, model: str, dtype: str, ids, pad_id: int, new_tokens: int, window_s: float = 5.0,
                    rounds: int = 3, lead_s: float = 0.5) -> Ceiling:
    """The machine's ceiling on this work with transformers' ``generate``, on ``wb``'s engines
    (see the module's docstring): rank 0 alone with every prompt against every engine with its
    share."""
    _check_window(window_s, rounds)
    work = dict(model=model, dtype=dtype, ids=ids, pad_id=pad_id, new_tokens=new_tokens)
    alone_s = wb.apply(ceiling_warm_up, **work, stream=False, what="loading the ceiling's model")[0]

    def together(start_at, period, count):
        return wb.apply(ceiling_runs, **work, start_at=start_at, period=period, count=count, share=True,
                        stream=False, what="the ceiling's runs")

    def alone(start_at, period, count):
        return wb.apply(ceiling_runs, **work, start_at=start_at, period=period, count=count, share=False,
                        ranks=[0], stream=False, what="the ceiling's runs")

    ceiling = _measure_rounds(together, alone, alone_s=alone_s, engines=wb.world_size, window_s=window_s,
                              rounds=rounds, lead_s=lead_s, step=TRANSFORMERS_STEP)
    wb.apply(drop_ceiling_model, stream=False, what="dropping the ceiling's model")
    return ceiling


def measure_own_ceiling(wb, single, prompts, *, window_s: float = 5.0, rounds: int = 3, lead_s: float = 0.5,
                        **options) -> Ceiling:
    """The machine's ceiling on this work with mpbook's own step: every engine of ``wb`` runs
    its share of a data-parallel run by itself, all from one signal, against the one-engine
    cluster ``single`` running every prompt (the bench's "one device"). ``options`` are
    :meth:`mpbook.workbench.Workbench.generate`'s (model, max_new_tokens, dtype, compile...).

    Data parallel's ranks never talk during a run, so this is the most N engines give with the
    very step the layouts run: its kernels, its weights' storage and its host work."""
    _check_window(window_s, rounds)
    windows = own_ceiling_rounds(wb, single, prompts, window_s=window_s, lead_s=lead_s, **options)
    for _ in range(rounds):
        windows.round()
    return windows.ceiling()


def own_ceiling_rounds(wb, single, prompts, *, window_s: float = 5.0, lead_s: float = 0.5, **options) -> Rounds:
    """:func:`measure_own_ceiling`'s windows, loaded and ready, one round per
    :meth:`Rounds.round`: ``bench`` runs one before each of its rounds of the layouts, so that
    the ceiling and the layouts it is held against share the machine's drift."""
    _check_window(window_s, 1)
    together_request = wb.session.request(prompts, strategy="data", dp=wb.world_size, **options)
    alone_request = single.session.request(prompts, strategy="data", **options)

    def load() -> None:
        # Loaded (and compiled) by a run of the whole cluster before each round, so that the
        # ticks' runs load nothing: a layout run since (bench's, between rounds) loaded its own.
        wb.generate(prompts, strategy="data", dp=wb.world_size, **options)

    warm = single.generate(prompts, strategy="data", **options)

    def together(start_at, period, count):
        return wb.apply(own_runs, request=together_request, start_at=start_at, period=period, count=count,
                        stream=False, what="the ceiling's runs")

    def alone(start_at, period, count):
        return single.apply(own_runs, request=alone_request, start_at=start_at, period=period, count=count,
                            stream=False, what="the ceiling's runs")

    return Rounds(together, alone, alone_s=warm.new_tokens / generation_tokens_per_s(warm),
                  engines=wb.world_size, window_s=window_s, lead_s=lead_s, step=OWN_STEP, before_round=load)


def _check_window(window_s: float, rounds: int) -> None:
    if window_s <= 0 or rounds < 1:
        raise ValueError(f"window_s={window_s}, rounds={rounds}: need a positive window and at least one round")


def _measure_rounds(together, alone, *, alone_s: float, engines: int, window_s: float, rounds: int,
                    lead_s: float, step: str) -> Ceiling:
    """``rounds`` rounds of :class:`Rounds` at once."""
    windows = Rounds(together, alone, alone_s=alone_s, engines=engines, window_s=window_s, lead_s=lead_s, step=step)
    for _ in range(rounds):
        windows.round()
    return windows.ceiling()


class Rounds:
    """A ceiling's pairs of windows, A B B A, one round at a time: ``together(start_at, period,
    count)`` on every engine, ``alone(...)`` on one; each returns every engine's runs.

    The runs of a window begin on wall-clock ticks a period apart, every engine on the same
    ticks, with no message between them: so they run at the same time as a layout's ranks do,
    and the batch is done when its slowest engine is (as a layout's run is timed; the module's
    docstring says why not back to back). The period is half as long again as one engine's run
    of the whole batch (``alone_s``), so that a run ends before the next tick.

    ``lead_s``: how far in the future the first tick is, so that every engine has it in time
    (one apply reaches 2 local engines in a few ms; a loaded machine takes longer). A window
    in which a run began more than a tenth of the period late is run again with a longer lead
    and, if a run overran, a longer period.
    Engines on several hosts need their clocks in step (NTP); ``late_s`` says how late the
    latest start was."""

    def __init__(self, together, alone, *, alone_s: float, engines: int, window_s: float, lead_s: float, step: str,
                 before_round=None):
        self._together, self._alone = together, alone
        self._before_round = before_round  # makes the engines ready again (after other runs between rounds)
        self.engines, self.window_s, self.step = engines, window_s, step
        self.period = 1.5 * alone_s + 0.02
        self.count = max(2, round(window_s / self.period))
        self.lead = lead_s
        self.together_tok_s: list[float] = []
        self.alone_tok_s: list[float] = []
        self.per_engine: list[list[dict]] = []
        self.late_s = 0.0

    def _window(self, run) -> list[dict]:
        for _ in range(3):
            runs = run(time.time() + self.lead, self.period, self.count)
            late = max(c["late_s"] for c in runs)
            if late <= 0.1 * self.period:
                break
            # A run began late: the first tick reached an engine after its time (a loaded
            # machine), or a run overran its period (engines sharing fewer cores than they
            # are take longer together than one alone). Again, with more time for both, kept.
            self.lead = min(2 * self.lead + late, 10.0)
            self.period = max(self.period, 1.5 * max(max(c["seconds"]) for c in runs) + 0.02)
        return runs

    def round(self) -> None:
        """One pair of windows; every other round alone first (A B B A: drift of a noisy
        machine hits both alike)."""
        first = len(self.alone_tok_s) % 2 == 0
        if self._before_round is not None:
            self._before_round()
        for which in (("together", "alone") if first else ("alone", "together")):
            runs = self._window(self._together if which == "together" else self._alone)
            tokens = sum(sum(c["tokens"]) for c in runs)
            seconds = sum(max(c["seconds"][k] for c in runs) for k in range(self.count))
            (self.together_tok_s if which == "together" else self.alone_tok_s).append(tokens / seconds)
            if which == "together":
                self.per_engine.append(runs)
            self.late_s = max([self.late_s] + [c["late_s"] for c in runs])

    def ceiling(self, *, interleaved: bool = False) -> Ceiling:
        """The rounds so far; ``interleaved``: each was run just before a round of the layouts."""
        return Ceiling(self.engines, self.window_s, list(self.together_tok_s), list(self.alone_tok_s), self.late_s,
                       list(self.per_engine), step=self.step, runs=self.count, interleaved=interleaved)


def ceiling_shares(records: list[dict], *ceilings: Ceiling) -> str:
    """Each layout of ``bench``'s records as a % of each ceiling: its generation tokens/s over
    one device's, against the ceiling's ratio. The first ceiling is the headline: the records
    (and the JSON) keep it as ``ceiling`` and ``ceiling_percent``, and every one under
    ``ceilings`` by its step. A ceiling measured round by round with the layouts also gives
    each round's share (that round's speedup over that round's ceiling): their range shows how
    much the machine's noise moves the headline."""
    base = next(r for r in records if r["strategy"] == "single")
    lines = [ceiling.format() for ceiling in ceilings]
    lines.append("  each layout's tokens/s (prefill and decode) over one device's, as a % of "
                 + " and of ".join(f"the ceiling with {c.step}" for c in ceilings) + ":")
    for record in records:
        if record is base or not base["generation_tokens_per_s"]:
            continue
        speedup = record["generation_tokens_per_s"] / base["generation_tokens_per_s"]
        record["ceilings"] = {}
        shares = []
        for c in ceilings:
            entry = {"ratio": c.ratio, "percent": 100 * speedup / c.ratio,
                     "rounds": [[t, a] for t, a in zip(c.together_tok_s, c.alone_tok_s)]}
            words = f"{entry['percent']:.0f}% with {c.step}"
            by_round = _shares_by_round(record, base, c)
            if by_round:
                entry["percent_by_round"] = by_round
                words += f" (rounds {min(by_round):.0f}-{max(by_round):.0f}%)"
            record["ceilings"][c.step] = entry
            shares.append(words)
        record["ceiling"] = ceilings[0].ratio
        record["ceiling_percent"] = 100 * speedup / ceilings[0].ratio
        lines.append(f"  {record['strategy']:<8} dp={record['dp']} pp={record['pp']} tp={record['tp']}: "
                     f"{speedup:.2f}x one device = {', '.join(shares)}")
    return "\n".join(lines)


def _shares_by_round(record: dict, base: dict, ceiling: Ceiling) -> list[float]:
    """Round k's speedup over round k's ceiling, in %, where the ceiling's rounds were run with
    the layouts' (none otherwise)."""
    ours, theirs = record.get("generation_tokens_per_s_rounds"), base.get("generation_tokens_per_s_rounds")
    if not ceiling.interleaved or not ours or not theirs or not (len(ours) == len(theirs) == len(ceiling.alone_tok_s)):
        return []
    return [100 * (o / b) / (t / a) for o, b, t, a in zip(ours, theirs, ceiling.together_tok_s, ceiling.alone_tok_s)]


# --------------------------------------------------------------------------- the peer
@dataclass
class Side:
    """One implementation's runs of one layout."""

    tok_s: list[float] = field(default_factory=list)  # per round
    tokens: list[list[int]] | None = None  # the first timed run's new tokens, per prompt
    error: str | None = None  # why it could not run

    @property
    def median(self) -> float | None:
        return statistics.median(self.tok_s) if self.tok_s and self.error is None else None


@dataclass
class PeerRow:
    kind: str
    layout: str  # "dp=2" ...
    mpbook: Side
    transformers: Side
    reference: list[list[int]]

    def verdict(self, side: Side) -> str:
        """"= one device", or "fails: reason"."""
        if side.error is not None:
            return f"fails: {side.error}"
        if side.tokens is None:
            return "fails: no tokens came back"
        differ = [i for i, (a, b) in enumerate(zip(side.tokens, self.reference)) if a != b]
        if differ or len(side.tokens) != len(self.reference):
            shown = ", ".join(map(str, differ[:6])) + (" ..." if len(differ) > 6 else "")
            return f"fails: tokens of prompt{'s' if len(differ) != 1 else ''} {shown} differ from one device's"
        return "= one device"

    def ok(self, side: Side) -> bool:
        return self.verdict(side) == "= one device"

    @property
    def ratio(self) -> float | None:
        a, b = self.mpbook.median, self.transformers.median
        return a / b if a and b else None

    def payload(self) -> dict:
        return {"layout": self.kind, "degrees": self.layout, "mpbook_tok_s": self.mpbook.median,
                "transformers_tok_s": self.transformers.median, "mpbook_over_transformers": self.ratio,
                "mpbook": self.verdict(self.mpbook), "transformers": self.verdict(self.transformers),
                "mpbook_rounds": self.mpbook.tok_s, "transformers_rounds": self.transformers.tok_s}


@dataclass
class PeerReport:
    engines: int
    device_type: str
    model: str
    batch: int
    new_tokens: int
    dtype: str
    rounds: int
    transformers_version: str
    rows: list[PeerRow]
    ceiling: Ceiling | None
    compiled: bool = False  # mpbook's side ran with --compile (compiled in the warm-up round)

    def percent(self, tok_s: float | None) -> str:
        """``tok_s`` as a % of the ceiling's N engines together (that is, its speed-up over one
        engine as a share of the ceiling's)."""
        if tok_s is None or self.ceiling is None:
            return "-"
        return f"{100 * tok_s / self.ceiling.together:.0f}%"

    def format(self) -> str:
        def num(x):
            return "-" if x is None else f"{x:,.1f}"

        head = ("layout", "mpbook tok/s", "transformers tok/s", "mpbook/transformers", "mpbook % ceiling",
                "transformers % ceiling", "mpbook", "transformers")
        table = [head]
        for row in self.rows:
            table.append((f"{row.kind} {row.layout}", num(row.mpbook.median), num(row.transformers.median),
                          "-" if row.ratio is None else f"{row.ratio:.2f}x", self.percent(row.mpbook.median),
                          self.percent(row.transformers.median), row.verdict(row.mpbook),
                          row.verdict(row.transformers)))
        widths = [max(len(r[c]) for r in table) for c in range(len(head))]
        lines = [
            f"mpbook against transformers {self.transformers_version} on {self.engines} {self.device_type} engines: "
            f"model {self.model}, {self.batch} prompts x {self.new_tokens} new tokens, {self.dtype}, greedy; median of "
            f"{self.rounds} interleaved rounds" + ("; mpbook with --compile (compiled in the warm-up round), "
                                                    "transformers eager" if self.compiled else ""),
            "  tok/s: every prompt's new tokens over the engines' generation time (prefill and decode); "
            "'= one device': the tokens of plain generate on one engine",
        ]
        if self.ceiling is not None:
            lines.append("  " + self.ceiling.format())
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
        return "\n".join(lines)

    def payload(self) -> dict:
        return {"engines": self.engines, "device_type": self.device_type, "model": self.model, "batch": self.batch,
                "new_tokens": self.new_tokens, "dtype": self.dtype, "rounds": self.rounds,
                "transformers": self.transformers_version, "rows": [r.payload() for r in self.rows],
                "ceiling": self.ceiling.payload() if self.ceiling else None, "compiled": self.compiled}


def _first_error(values) -> str | None:
    return next((v for v in values if v), None)


def compare_with_transformers(wb, *, model: str = DEFAULT_MODEL, prompts: list[str], new_tokens: int = 16,
                              dtype: str = DEFAULT_DTYPE, rounds: int = 3, window_s: float = 5.0,
                              kinds=KINDS, compile: bool = False, log=print) -> PeerReport:
    """mpbook and transformers, layout by layout at full degree on ``wb``'s engines, interleaved."""
    import transformers

    from .errors import MpbookError

    # Plain text (no chat template): transformers' generate gets the very ids mpbook does.
    ids, pad_id = encode(model, prompts, chat=False)
    work = dict(model=model, dtype=dtype, ids=ids, pad_id=pad_id, new_tokens=new_tokens)
    ceiling = None
    if window_s > 0:
        ceiling = measure_ceiling(wb, **work, window_s=window_s, rounds=rounds)
        log(ceiling.format())
    reference = wb.apply(reference_tokens, **work, ranks=[0], stream=False, what="one device's tokens")[0]
    n = wb.world_size
    rows = []
    try:
        for kind in kinds:
            degrees = {"data": dict(dp=n), "tensor": dict(tp=n), "pipeline": dict(pp=n)}[kind]
            row = PeerRow(kind, " ".join(f"{k}={v}" for k, v in degrees.items()), Side(), Side(), reference)

            def ours(timed: bool):
                try:
                    result = wb.generate(prompts, strategy=kind, model=model, max_new_tokens=new_tokens, dtype=dtype,
                                         chat=False, ignore_eos=True, compile=compile, **degrees)
                except MpbookError as exc:
                    row.mpbook.error = str(exc).splitlines()[0]
                    return
                if timed:
                    row.mpbook.tok_s.append(generation_tokens_per_s(result))
                    if row.mpbook.tokens is None:
                        row.mpbook.tokens = result.token_ids

            def theirs(timed: bool):
                try:
                    runs = wb.apply(peer_generate, kind=kind, **work, stream=False, what=f"transformers' {kind}")
                except MpbookError as exc:  # a rank failed alone, or a collective timed out
                    row.transformers.error = str(exc).splitlines()[0]
                    return
                error = _first_error(r.get("error") for r in runs)
                if error:
                    row.transformers.error = error
                    return
                if timed:
                    seconds = max(r["seconds"] for r in runs)
                    row.transformers.tok_s.append(len(ids) * new_tokens / seconds)
                    if row.transformers.tokens is None:
                        # data: each replica's rows in order; tensor and pipeline: every rank
                        # returns every row (rank 0's).
                        row.transformers.tokens = ([t for r in runs for t in r["tokens"]] if kind == "data"
                                                   else runs[0]["tokens"])

            try:
                loaded = wb.apply(peer_load, kind=kind, model=model, dtype=dtype, stream=False,
                                  what=f"loading transformers' {kind}")
                row.transformers.error = _first_error(loaded)
            except MpbookError as exc:
                row.transformers.error = str(exc).splitlines()[0]
            ours(timed=False)  # warm-up: loads, first touch
            if row.transformers.error is None:
                theirs(timed=False)
            for r in range(rounds):
                order = (ours, theirs) if r % 2 == 0 else (theirs, ours)
                for run in order:
                    side = row.mpbook if run is ours else row.transformers
                    if side.error is None:
                        run(timed=True)
            if kind != "data":  # the plain model stays for the data row; a distributed one goes
                wb.apply(_drop_peer, kind=kind, stream=False, what="dropping transformers' model")
            rows.append(row)
            log(f"  {kind}: mpbook {row.verdict(row.mpbook)}, transformers {row.verdict(row.transformers)}")
    finally:
        wb.apply(drop_models, stream=False, what="dropping the peer's models")
    return PeerReport(n, wb.device_type, model, len(prompts), new_tokens, dtype, rounds, transformers.__version__, rows,
                      ceiling, compiled=compile)


def _drop_peer(state, *, kind: str) -> None:
    import gc

    _models(state).pop(("peer", kind), None)
    gc.collect()


def bench_against_transformers(prompts: list[str], *, model: str = DEFAULT_MODEL, engines: int | None = None,
                               cpu: bool = False, new_tokens: int = 16, dtype: str = DEFAULT_DTYPE, repeats: int = 3,
                               window_s: float = 5.0, transport: str = "auto", compile: bool = False,
                               log=print) -> dict:
    """``python -m mpbook bench --against transformers``: start the engines, compare, print the table."""
    from .workbench import Workbench

    with Workbench.start(engines, cpu=cpu, transport=transport) as wb:
        log(wb.table())
        report = compare_with_transformers(wb, model=model, prompts=prompts, new_tokens=new_tokens, dtype=dtype,
                                           rounds=repeats, window_s=window_s, compile=compile, log=log)
    log(report.format())
    return report.payload()
