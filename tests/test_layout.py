"""Layouts, the groups of a mesh, and the plans the strategies cut by, all without engines:
which rank sits where, which ranks talk, which prompts and layers each one gets, and the
choice of degrees for a strategy on a number of engines."""

from __future__ import annotations

import pytest

from mpbook import Layout, MpbookError
from mpbook.layout import DIMS, Coords, Mesh
from mpbook.parallel.data import replica_rows
from mpbook.parallel.pipeline import split_layers
from mpbook.session import check_prompts, choose_layout


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
        ("tensor", 2, {"tp": 3}, r"dp=1 x pp=1 x tp=3 = 3, but 2 engines are up; choose degrees whose product is 2 "
                                 r"\(or `%mp restart` with -n 3\)"),
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
