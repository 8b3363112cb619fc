"""Layouts, the groups of a mesh, and the plans the strategies cut by, all without engines:
which rank sits where, which ranks talk, which prompts and layers each one gets, and the
choice of degrees for a strategy on a number of engines."""

from __future__ import annotations

import re

import pytest

from mpbook import Layout, MpbookError
from mpbook.layout import DIMS, Coords, Mesh
from mpbook.models import tiny_config
from mpbook.parallel.data import replica_rows
from mpbook.parallel.pipeline import split_layers
from mpbook.session.layout_choice import choose_layout
from mpbook.session.prompts import check_prompts


def test_a_layout_is_a_grid_with_tp_innermost():
    layout = Layout(dp=2, pp=2, tp=2)
    assert layout.world_size == 8 and layout.shape == (2, 2, 1, 2)
    assert [layout.coords(r) for r in (0, 1, 2, 7)] == [
        Coords(0, 0, 0, 0), Coords(0, 0, 0, 1), Coords(0, 1, 0, 0), Coords(1, 1, 0, 1)
    ]
    # neighbouring ranks (neighbouring GPUs on one host) share a tensor-parallel group
    assert layout.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups("pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.groups(("pp", "tp")) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.group_ranks("pp", 5) == [5, 7]
    assert str(layout) == "dp=2 x pp=2 x tp=2"
    assert str(Layout(tp=2, ep=2)) == "dp=1 x pp=1 x tp=2 x ep=2"


def test_every_rank_is_in_exactly_one_group_along_any_dims():
    layout = Layout(dp=3, pp=2, tp=2, ep=2)
    for dims in ("dp", "pp", "tp", "ep", ("ep", "tp"), ("dp", "pp")):
        groups = layout.groups(dims)
        assert sorted(r for g in groups for r in g) == list(range(layout.world_size))
        for group in groups:
            coords = [layout.coords(r) for r in group]
            fixed = [d for d in DIMS if d not in ((dims,) if isinstance(dims, str) else dims)]
            assert len({tuple(getattr(c, d) for d in fixed) for c in coords}) == 1


@pytest.mark.parametrize("bad", [{"dp": 0}, {"tp": -1}, {"pp": 1.5}, {"ep": True}])
def test_a_degree_is_a_whole_number_of_at_least_one(bad):
    with pytest.raises(ValueError, match="every degree must be a whole number >= 1"):
        Layout(**bad)


def test_a_rank_outside_the_world_is_an_error():
    with pytest.raises(ValueError, match="rank 4 is outside a world of 4"):
        Layout(pp=4).coords(4)


def test_a_mesh_knows_its_rank_coordinates_and_group_ranks_without_a_process_group():
    mesh = Mesh(Layout(pp=2, tp=2), 3, "cpu")
    assert mesh.coords == Coords(dp=0, pp=1, ep=0, tp=1)
    assert mesh.ranks("tp") == [2, 3] and mesh.ranks("pp") == [1, 3]
    assert repr(mesh) == "Mesh(dp=1 x pp=2 x tp=2, rank=3: dp=0 pp=1 ep=0 tp=1)"


# ----------------------------------------------------------------------------- choosing degrees
@pytest.mark.parametrize(
    "strategy, engines, given, expected",
    [
        ("tensor", 2, {}, Layout(tp=2)),
        ("pipeline", 4, {}, Layout(pp=4)),
        ("data", 4, {}, Layout(dp=4)),
        ("tensor", 4, {"pp": 2}, Layout(pp=2, tp=2)),  # the strategy's own degree takes the rest
        ("data", 4, {"tp": 2}, Layout(dp=2, tp=2)),
        ("pipeline", 8, {"dp": 2, "tp": 2}, Layout(dp=2, pp=2, tp=2)),
        ("tensor", 4, {"tp": 4}, Layout(tp=4)),
        ("data", 1, {}, Layout()),
    ],
)
def test_choose_layout(strategy, engines, given, expected):
    assert choose_layout(strategy, engines, **given) == expected


@pytest.mark.parametrize(
    "strategy, engines, given, message",
    [
        ("tensor", 2, {"tp": 3}, r"^dp=1 x pp=1 x tp=3 = 3, but 2 engines are up; layouts of 2 engines: dp=1 x pp=1 x "
                                 r"tp=2; dp=1 x pp=2 x tp=1; dp=2 x pp=1 x tp=1; or, for dp=1 x pp=1 x tp=3, run on 3 "
                                 r"engines \(`%mp stop`, then `%mp start -n 3`, or Workbench.start\(3\)\)$"),
        ("data", 2, {"pp": 3}, "pp=3 = 3 does not divide the 2 engines that are up"),
        ("tensor", 4, {"pp": 2, "dp": 4}, "dp=4 x pp=2 = 8 does not divide the 4 engines"),
        ("sideways", 2, {}, "unknown strategy 'sideways'; choose one of data, pipeline, tensor"),
        ("tensor", 2, {"pp": 0}, "--pp 0: a degree is a whole number >= 1"),
    ],
)
def test_choose_layout_names_the_numbers_when_they_do_not_fit(strategy, engines, given, message):
    with pytest.raises(MpbookError, match=message):
        choose_layout(strategy, engines, **given)


def test_prompts_are_checked_before_tokenizing():
    check_prompts(["a", "b"])
    with pytest.raises(MpbookError, match="no prompts"):
        check_prompts([])
    with pytest.raises(MpbookError, match="prompt 1 is empty"):
        check_prompts(["a", "  "])
    with pytest.raises(MpbookError, match="prompt 0 is empty"):
        check_prompts([None])


# ----------------------------------------------------------------------------- the strategies' plans
def test_replicas_take_contiguous_prompts_earlier_ones_the_remainder():
    assert [replica_rows(5, 2, r) for r in range(2)] == [range(0, 3), range(3, 5)]
    assert [replica_rows(3, 4, r) for r in range(4)] == [range(0, 1), range(1, 2), range(2, 3), range(3, 3)]
    assert [i for r in range(3) for i in replica_rows(10, 3, r)] == list(range(10))


def test_layers_per_stage_balanced_or_as_given():
    assert split_layers(6, 4) == [range(0, 2), range(2, 4), range(4, 5), range(5, 6)]
    assert split_layers(6, 1) == [range(0, 6)]
    assert split_layers(6, 2, [5, 1]) == [range(0, 5), range(5, 6)]
    with pytest.raises(MpbookError, match="pp=8: the model has 6 decoder layers, so at most 6 stages"):
        split_layers(6, 8)
    with pytest.raises(MpbookError, match=r"stage sizes \[2, 2\]: need 2 sizes .* add up to the 6 layers"):
        split_layers(6, 2, [2, 2])
    with pytest.raises(MpbookError, match="stage sizes"):
        split_layers(6, 2, [6, 0])


# ----------------------------------------------------------------------------- advice that leads somewhere
# A layout error ends with the layouts of these engines that this model and these prompts
# allow, and, when the model takes the layout as asked, what else it needs. Every piece of
# that advice, followed, must pass the same check (issue: `--dp 2` advised on 3 engines).
LAYOUT_RE = re.compile(r"dp=(\d+) x pp=(\d+) x tp=(\d+)(?: x ep=(\d+))?")


def _layouts_in(text: str) -> list[Layout]:
    return [Layout(int(dp), int(pp), int(tp), int(ep or 1)) for dp, pp, tp, ep in LAYOUT_RE.findall(text)]


def _degrees(layout: Layout) -> dict[str, int]:
    return {d: getattr(layout, d) for d in DIMS}


def llama4():
    from mpbook.models.presets import family_config

    return family_config("llama")  # 4 layers, 4 heads over 2 KV heads


def mixtral():
    from mpbook.models.presets import family_config

    return family_config("mixtral")  # 4 layers, 4 heads over 2 KV heads, 4 experts


@pytest.mark.parametrize(
    "config, strategy, engines, prompts, given, problems",
    [
        # 2 prompts for dp=3: the old advice "or use dp <= 2" led to a wrong engine count
        (tiny_config, "data", 3, 2, {}, ["2 prompts for dp=3 replicas: every replica needs at least one"]),
        (tiny_config, "data", 3, 2, {"dp": 2}, ["dp=2 x pp=1 x tp=1 = 2, but 3 engines are up"]),
        # the model's limit first, then the engine count, in one message
        (llama4, "pipeline", 2, 2, {"pp": 8},
         ["pp=8: the model has 4 decoder layers, so at most 4 stages; choose pp in 1..4",
          "dp=1 x pp=8 x tp=1 = 8, but 2 engines are up"]),
        (tiny_config, "tensor", 2, 1, {"tp": 3},
         ["tp=3 does not divide the 8 attention heads (4 KV heads) of this llama model; choose tp in {1, 2, 4}",
          "dp=1 x pp=1 x tp=3 = 3, but 2 engines are up"]),
        (tiny_config, "tensor", 3, 4, {}, ["tp=3 does not divide the 8 attention heads"]),
        (mixtral, "expert", 4, 4, {"ep": 3, "tp": 3},
         ["tp=3 does not divide the 4 attention heads (2 KV heads) of this mixtral model; choose tp in {1, 2}",
          "ep=3 does not divide the 4 experts of this mixtral model; choose ep in {1, 2, 4}",
          "dp=1 x pp=1 x ep=3 x tp=3 = 9, but 4 engines are up"]),
        (tiny_config, "pipeline", 2, 4, {"microbatches": 5},
         ["--microbatches 5: each replica gets at least 4 prompts, so choose microbatches in 1..4"]),
        (tiny_config, "data", 2, 4, {"pp": 3}, ["pp=3 = 3 does not divide the 2 engines that are up"]),
        (tiny_config, "tensor", 3, 2, {"pp": 2, "stage_sizes": (4, 2)},
         ["pp=2 = 2 does not divide the 3 engines that are up"]),
        (tiny_config, "pipeline", 4, 1, {"dp": 2, "stage_sizes": (4, 2)}, ["1 prompt for dp=2 replicas"]),
    ],
)
def test_layout_advice_is_checked_before_it_is_given(config, strategy, engines, prompts, given, problems):
    config = config()
    given = dict(given)
    checks = dict(config=config, microbatches=given.pop("microbatches", 1), stage_sizes=given.pop("stage_sizes", None))
    with pytest.raises(MpbookError) as info:
        choose_layout(strategy, engines, prompts=prompts, **given, **checks)
    message = str(info.value)
    # every problem at once, the model's own limits first
    for problem in problems:
        assert problem in message
    assert [message.index(p) for p in problems] == sorted(message.index(p) for p in problems)
    assert "dp <=" not in message and "%mp restart" not in message

    listing, _, asked = message.partition("; or, for ")
    listing = listing[listing.index(f"layouts of {engines} engines"):]
    suggested = _layouts_in(listing)
    assert suggested, message
    for layout in suggested:  # each one, followed, runs
        assert layout.world_size == engines
        keep = dict(checks)
        if "with --microbatches 1" in listing:
            keep["microbatches"] = 1
        if checks["stage_sizes"] and len(checks["stage_sizes"]) != layout.pp:
            assert "without --stages" in listing
            keep["stage_sizes"] = None
        assert choose_layout(strategy, engines, prompts=prompts, **_degrees(layout), **keep) == layout
    if asked:  # the layout as asked, with more prompts or engines
        layout = _layouts_in(asked)[0]
        more = re.search(r"give at least (\d+) prompts", asked)
        run_on = re.search(r"run on (\d+) engines", asked)
        n_prompts = int(more.group(1)) if more else prompts
        n_engines = int(run_on.group(1)) if run_on else engines
        assert choose_layout(strategy, n_engines, prompts=n_prompts, **_degrees(layout), **checks) == layout
    else:  # no such offer when the model itself refuses the layout
        assert any(p.split(":")[0].split()[0] in ("pp=8", "tp=3", "ep=3") for p in problems)


def test_no_layout_of_the_engines_fits_the_model_says_each_degree_choice():
    from mpbook.models.presets import family_config

    # 4 heads, 2 KV heads, 4 layers on 3 engines with 2 prompts: tp=3 and dp=3 are out, pp=3 is in
    assert choose_layout("pipeline", 3, config=family_config("llama"), prompts=2) == Layout(pp=3)
    # with 2 layers nothing over 3 engines works
    with pytest.raises(MpbookError) as info:
        choose_layout("pipeline", 3, config=family_config("llama", num_hidden_layers=2), prompts=2)
    assert str(info.value) == (
        "pp=3: the model has 2 decoder layers, so at most 2 stages; choose pp in 1..2; no layout of 3 engines is "
        "valid for this model and 2 prompts (of the degrees that divide 3: dp in {1}, pp in {1}, tp in {1})"
    )


@pytest.mark.parametrize("cpu, attached", [(True, False), (False, False), (False, True)])
def test_the_commands_layout_advice_names_exist(cpu, attached):
    import inspect

    from mpbook.cluster import Cluster
    from mpbook.magics import parse
    from mpbook.workbench import Workbench

    with pytest.raises(MpbookError) as info:
        choose_layout("tensor", 2, tp=4, config=tiny_config(), prompts=2, cpu=cpu, attached=attached)
    message = str(info.value)
    commands = re.findall(r"`(%mp [^`]*)`", message)
    assert commands and "`%mp stop`" in message
    for command in commands:  # each parses as the magic would (no UsageError)
        parse(command.removeprefix("%mp "), cell=False)
    calls = re.findall(r"Workbench\.(start|attach)\(([^)]*)\)", message)
    assert len(calls) == 1
    name, arguments = calls[0]
    args = eval(f"(lambda *a, **k: (a, k))({arguments.replace('...', 'None')})")  # noqa: S307  our own text
    target = Workbench.start if name == "start" else Cluster.attach  # (Workbench.attach passes its options on)
    inspect.signature(target).bind(*args[0], **args[1])
    # what the old advice said does not exist
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="unrecognized arguments: -n 4"):
        parse("restart -n 4", cell=False)


def test_default_stages_balance_the_weights_a_decode_step_reads():
    from mpbook.parallel.pipeline import balanced_stage_sizes

    # a head of 8 layers' weights (llama-135m): the last stage takes fewer layers
    assert balanced_stage_sizes(30, 3, 8.0) == [13, 12, 5]
    assert balanced_stage_sizes(30, 2, 8.0) == [19, 11]
    # a head under half a layer: the equal split
    assert balanced_stage_sizes(6, 4, 0.4) == [len(r) for r in split_layers(6, 4)]
    assert balanced_stage_sizes(8, 1, 8.0) == [8]
    with pytest.raises(MpbookError, match="at most 6 stages"):
        balanced_stage_sizes(6, 8)
