"""The layout of a run: the degrees a strategy takes on the engines that are up, checked
against the model, the prompts and the engine count at once; an error lists every problem
and the layouts that would run (and fit in memory, where the planner can say)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ..errors import MpbookError
from ..layout import DIMS, OWN_DIM, STRATEGIES, Layout
from ..options import check_degree
from ..parallel.data import replica_rows


def warn_across_hosts(cluster, layout: Layout) -> None:
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

    from ..models.support import layout_problems

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
    from ..planner.suggestions import layouts, valid_layouts, why_invalid
    from ..units import divisors

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
