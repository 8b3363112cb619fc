"""`python -m mpbook bench`: one device against each strategy, side by side."""

from __future__ import annotations

import statistics

import pytest

from mpbook.bench import bench_strategies
from mpbook.engine.steps import PARTS


@pytest.mark.cluster
def test_bench_gives_each_layouts_tokens_and_where_its_decode_step_went(tiny_folder):
    lines: list[str] = []
    records = bench_strategies(model=tiny_folder, engines=2, cpu=True, batch=4, new_tokens=6, repeats=1,
                               window_s=0, log=lines.append)
    assert [r["strategy"] for r in records] == ["single", "data", "pipeline", "tensor"]
    assert all(r["tokens_match"] and r["max_abs_logit_diff"] < 1e-4 for r in records)
    by_strategy = {r["strategy"]: r["step_breakdown_ms"] for r in records}
    # every rank decodes: the one device, both replicas, both stages, both tensor-parallel ranks
    assert [len(ranks) for ranks in by_strategy.values()] == [1, 2, 2, 2]
    for ranks in by_strategy.values():
        for rank in ranks:
            assert sum(rank[part] for part in PARTS) == pytest.approx(rank["steps"], rel=0.05)
            assert rank["steps"] > 0 and rank["compute"] > 0
    # a tensor-parallel step all-reduces on both ranks; one device has nobody to talk to
    assert all(rank["collectives"] > 0 for rank in by_strategy["tensor"])
    assert by_strategy["single"][0]["collectives"] == 0
    # each layout's row is followed by its step's parts, per rank
    steps = [i for i, line in enumerate(lines) if "decode step per rank, ms:" in line]
    rows = [i for i, line in enumerate(lines) if "tok/s" in line and "one device)" in line]
    assert len(rows) == 4 and steps == [i + 1 for i in rows]
    tensor_step = lines[steps[-1]]
    assert all(part in tensor_step for part in PARTS)


@pytest.mark.cluster
def test_bench_holds_each_layout_against_both_ceilings_measured_in_the_same_run(tiny_folder):
    """transformers' ceiling first, mpbook's own a round before each round of the layouts: both
    have one pair of windows per round, and each layout's % is its speedup over one device
    against each ceiling's ratio."""
    from mpbook.bench_peers import OWN_STEP, TRANSFORMERS_STEP

    lines: list[str] = []
    records = bench_strategies(model=tiny_folder, engines=2, cpu=True, batch=4, new_tokens=6, repeats=2,
                               window_s=0.3, log=lines.append)
    single = records[0]
    assert single["strategy"] == "single" and "ceilings" not in single
    for record in records[1:]:
        assert set(record["ceilings"]) == {OWN_STEP, TRANSFORMERS_STEP}
        speedup = record["generation_tokens_per_s"] / single["generation_tokens_per_s"]
        for ceiling in record["ceilings"].values():
            assert len(ceiling["rounds"]) == 2 and all(t > 0 and a > 0 for t, a in ceiling["rounds"])
            assert ceiling["ratio"] == pytest.approx(statistics.median(t / a for t, a in ceiling["rounds"]))
            assert ceiling["percent"] == pytest.approx(100 * speedup / ceiling["ratio"])
        assert record["ceiling_percent"] == record["ceilings"][OWN_STEP]["percent"]
        # mpbook's own ceiling ran round by round with the layouts: each round's share is that
        # round's speedup over that round's ceiling; transformers' ran before, so it has none
        own = record["ceilings"][OWN_STEP]
        assert own["percent_by_round"] == pytest.approx([
            100 * (ours / one) / (together / alone) for ours, one, (together, alone)
            in zip(record["generation_tokens_per_s_rounds"], single["generation_tokens_per_s_rounds"], own["rounds"])])
        assert "percent_by_round" not in record["ceilings"][TRANSFORMERS_STEP]
    shown = [line for line in "\n".join(lines).splitlines() if "the machine's ceiling with" in line]
    assert [OWN_STEP in shown[0], TRANSFORMERS_STEP in shown[1]] == [True, True]
    tensor_line = next(line for line in "\n".join(lines).splitlines()
                       if line.startswith("  tensor ") and "% with" in line)
    by_round = records[-1]["ceilings"][OWN_STEP]["percent_by_round"]
    low, high = min(by_round), max(by_round)
    assert f"(rounds {low:.0f}-{high:.0f}%)" in tensor_line
