"""The benchmark's yardsticks (mpbook.bench_peers): the machine's ceiling measured on real
engines, transformers' own distributed forms next to mpbook's, and the table that shows them."""

from __future__ import annotations

import importlib.util
import json
import statistics

import pytest

from mpbook import bench_peers
from mpbook.bench import BENCH_PROMPTS
from mpbook.models.tokenizer import generation_eos_ids

# Four prompts of different lengths: the batch is left-padded, and each of 2 replicas gets 2.
PROMPTS = BENCH_PROMPTS[:4]
# The tiny preset chooses end-of-sequence at the 10th new token of the first prompt: a fixed
# length goes on past it on every side, as mpbook's ignore_eos does.
NEW_TOKENS = 12
EOS_IDS = generation_eos_ids()
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None


def _peer_models_left(state) -> bool:
    return bench_peers.CACHE_KEY in state.cache


def _check_runs_from_shared_ticks(ceiling, rows: list[int]) -> None:
    """Every engine ran its share at each of the window's ticks, all of its tokens, and the
    batch's tokens/s is its tokens over the slowest engine's seconds, run by run."""
    assert ceiling.runs >= 2 and len(ceiling.together_tok_s) == len(ceiling.alone_tok_s) == len(ceiling.per_engine)
    assert all(t > 0 for t in ceiling.together_tok_s) and all(a > 0 for a in ceiling.alone_tok_s)
    for runs, together in zip(ceiling.per_engine, ceiling.together_tok_s):
        assert [c["rank"] for c in runs] == list(range(len(rows))) and [c["rows"] for c in runs] == rows
        for c in runs:
            assert c["tokens"] == [c["rows"] * NEW_TOKENS] * ceiling.runs
            assert len(c["seconds"]) == ceiling.runs and all(s > 0 for s in c["seconds"])
        for k in range(ceiling.runs):  # the same tick on every engine (each at most late_s after it)
            starts = [c["starts"][k] for c in runs]
            assert max(starts) - min(starts) <= ceiling.late_s + 1e-3
        slowest = sum(max(c["seconds"][k] for c in runs) for k in range(ceiling.runs))
        assert together == pytest.approx(sum(sum(c["tokens"]) for c in runs) / slowest)
    assert ceiling.ratio == pytest.approx(
        statistics.median(t / a for t, a in zip(ceiling.together_tok_s, ceiling.alone_tok_s)))
    assert f"{ceiling.ratio:.2f}x" in ceiling.format() and f"{ceiling.runs} runs" in ceiling.format()
    # each round's own pair on screen, whose quotients the ratio is the median of
    assert all(f"{t:,.1f} vs {a:,.1f}" in ceiling.format() for t, a in zip(ceiling.together_tok_s, ceiling.alone_tok_s))


@pytest.mark.cluster
def test_the_ceiling_runs_every_engines_share_from_the_same_ticks(workbench):
    ids, pad_id = bench_peers.encode("tiny", PROMPTS, chat=False)
    ceiling = bench_peers.measure_ceiling(workbench, model="tiny", dtype="float32", ids=ids, pad_id=pad_id,
                                          new_tokens=NEW_TOKENS, window_s=0.4, rounds=2)
    workbench.apply(bench_peers.drop_models, stream=False)
    assert ceiling.engines == 2 and ceiling.step == bench_peers.TRANSFORMERS_STEP
    _check_runs_from_shared_ticks(ceiling, rows=[2, 2])
    assert not any(workbench.apply(_peer_models_left, stream=False))


@pytest.mark.cluster
def test_the_ceiling_with_mpbooks_own_step_runs_data_parallel_shares_from_the_same_ticks(workbench):
    """Each engine loops its share of a data-parallel run by itself, against a one-engine
    cluster with every prompt; the runs generate the same tokens as the cluster's own run."""
    from mpbook.workbench import Workbench

    options = dict(model="tiny", max_new_tokens=NEW_TOKENS, ignore_eos=True, chat=False)
    with Workbench.start(1, cpu=True) as single:
        ceiling = bench_peers.measure_own_ceiling(workbench, single, PROMPTS, window_s=0.4, rounds=2, **options)
        assert ceiling.engines == 2 and ceiling.step == bench_peers.OWN_STEP
        _check_runs_from_shared_ticks(ceiling, rows=[2, 2])
        # The cluster still runs as before, and its tokens are one device's.
        alone = single.generate(PROMPTS, strategy="data", **options)
        assert workbench.generate(PROMPTS, strategy="data", **options).token_ids == alone.token_ids


def _ceiling_stores(state, rows_list):
    import torch

    from mpbook.models.packed_linear import available, is_packed
    from mpbook.models.weight_order import column_major

    stores = []
    for rows in rows_list:
        lm = bench_peers.ceiling_model(state, "tiny", "float32", rows)
        linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear) and m is not lm.get_output_embeddings()]
        stores.append(sorted({"packed" if is_packed(m) else "columns" if column_major(m.weight) else "rows"
                              for m in linears}))
    bench_peers.drop_ceiling_model(state)
    return stores, available(), any(k[0] == "ceiling" for k in bench_peers._models(state))


@pytest.mark.cluster
def test_the_ceilings_engines_store_their_weights_as_the_layouts_engines_do(workbench, engines_pack_every_weight):
    """The ceiling is the machine's with the kernels the layouts run: one row, column-major;
    4 rows, packed for oneDNN (where this torch has it); dropped after."""
    stores, packs, left = workbench.apply(_ceiling_stores, [1, 4, 1], stream=False, ranks=[0])[0]
    assert stores == [["columns"], ["packed"] if packs else ["rows"], ["columns"]]
    assert not left


def test_a_ceiling_needs_a_window_and_a_round():
    with pytest.raises(ValueError, match="positive window"):
        bench_peers.measure_ceiling(None, model="tiny", dtype="float32", ids=[[1]], pad_id=0, new_tokens=1,
                                    window_s=0)
    with pytest.raises(ValueError, match="at least one round"):
        bench_peers.measure_own_ceiling(None, None, ["a prompt"], window_s=1.0, rounds=0, model="tiny")


@pytest.mark.cluster
def test_mpbook_and_transformers_side_by_side_on_the_same_engines(workbench):
    from mpbook.reference import reference

    report = bench_peers.compare_with_transformers(workbench, model="tiny", prompts=PROMPTS, new_tokens=NEW_TOKENS,
                                                   rounds=2, window_s=0.3, log=lambda *_: None)
    assert [row.kind for row in report.rows] == ["data", "tensor", "pipeline"]
    assert [row.layout for row in report.rows] == ["dp=2", "tp=2", "pp=2"]

    # One device's tokens, checked against mpbook's own reference (plain generate in this
    # process, which ends a row at end-of-sequence: compare what it kept).
    _, expected = reference("tiny", PROMPTS, max_new_tokens=NEW_TOKENS, chat=False)
    one_device = report.rows[0].reference
    assert [row[: len(e)] for row, e in zip(one_device, expected)] == expected
    assert all(len(row) == NEW_TOKENS for row in one_device)
    assert any(t in EOS_IDS for t in one_device[0][:-1]), "the run should go on past an end-of-sequence"

    for row in report.rows:
        # mpbook: every layout runs, the same tokens as one device, two timed rounds.
        assert row.verdict(row.mpbook) == "= one device", row.kind
        assert len(row.mpbook.tok_s) == 2 and row.mpbook.median > 0
    data, tensor, pipeline = report.rows
    # transformers' data parallel is plain generate per replica: it runs and matches.
    assert data.verdict(data.transformers) == "= one device" and data.transformers.median > 0
    for row in (tensor, pipeline):
        if HAS_ACCELERATE:
            assert row.transformers.error is None and len(row.transformers.tok_s) == 2 and row.transformers.median > 0
            assert row.verdict(row.transformers) == "= one device" or "differ from one device" in row.verdict(
                row.transformers)
        else:  # transformers' DistributedConfig path loads with a device map, which needs accelerate
            assert row.transformers.tok_s == [] and row.transformers.median is None
            assert row.verdict(row.transformers).startswith("fails: ") and "accelerate" in row.transformers.error
    for row in report.rows:
        if row.transformers.median:
            assert row.ratio == pytest.approx(row.mpbook.median / row.transformers.median)
        else:
            assert row.ratio is None

    assert report.ceiling is not None and report.ceiling.ratio > 0
    text = report.format()
    lines = text.splitlines()
    table = lines[lines.index(next(line for line in lines if line.strip().startswith("layout"))):]
    assert len(table) == 4 and "mpbook/transformers" in table[0] and "% ceiling" in table[0]
    for row, line in zip(report.rows, table[1:]):
        assert line.strip().startswith(f"{row.kind} {row.layout}")
        assert f"{row.mpbook.median:,.1f}" in line
        assert row.verdict(row.transformers) in line
        if row.ratio is not None:
            assert f"{row.ratio:.2f}x" in line
    assert f"on 2 {workbench.device_type} engines" in lines[0]
    json.dumps(report.payload())  # the JSON the command writes
    assert not any(workbench.apply(_peer_models_left, stream=False))  # the engines hold only mpbook's model


def test_a_failing_form_is_a_row_that_says_why_and_keeps_its_numbers():
    reference = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    ok = bench_peers.Side(tok_s=[10.0, 30.0, 20.0], tokens=[list(r) for r in reference])
    wrong = bench_peers.Side(tok_s=[40.0], tokens=[[1, 2, 3], [4, 5, 0], [7, 0, 9]])
    broken = bench_peers.Side(error="ValueError: tp=3 does not divide 8 heads")
    rows = [
        bench_peers.PeerRow("data", "dp=2", ok, wrong, reference),
        bench_peers.PeerRow("tensor", "tp=2", ok, broken, reference),
    ]
    assert rows[0].verdict(ok) == "= one device"
    assert rows[0].verdict(wrong) == "fails: tokens of prompts 1, 2 differ from one device's"
    assert rows[1].verdict(broken) == "fails: ValueError: tp=3 does not divide 8 heads"
    assert rows[0].ratio == pytest.approx(20.0 / 40.0) and rows[1].ratio is None
    ceiling = bench_peers.Ceiling(2, 1.0, together_tok_s=[50.0, 30.0, 40.0], alone_tok_s=[40.0, 30.0, 25.0],
                                  late_s=0.0)
    assert ceiling.ratio == pytest.approx(1.25) and ceiling.together == 40.0
    report = bench_peers.PeerReport(2, "cpu", "tiny", 3, 3, "float32", 3, "5.x", rows, ceiling)
    lines = report.format().splitlines()
    data, tensor = lines[-2], lines[-1]
    assert data.split()[:6] == ["data", "dp=2", "20.0", "40.0", "0.50x", "50%"]
    assert "100%" in data and data.endswith("fails: tokens of prompts 1, 2 differ from one device's")
    assert tensor.split()[:5] == ["tensor", "tp=2", "20.0", "-", "-"]
    assert tensor.endswith("= one device  fails: ValueError: tp=3 does not divide 8 heads")


def test_each_layout_as_a_share_of_each_ceiling_the_first_the_headline():
    own = bench_peers.Ceiling(2, 1.0, together_tok_s=[110.0], alone_tok_s=[100.0], late_s=0.0,
                              step=bench_peers.OWN_STEP, runs=4)
    theirs = bench_peers.Ceiling(2, 1.0, together_tok_s=[137.5], alone_tok_s=[100.0], late_s=0.0, runs=4)
    records = [
        {"strategy": "single", "dp": 1, "pp": 1, "tp": 1, "generation_tokens_per_s": 100.0},
        {"strategy": "data", "dp": 2, "pp": 1, "tp": 1, "generation_tokens_per_s": 110.0},
        {"strategy": "tensor", "dp": 1, "pp": 1, "tp": 2, "generation_tokens_per_s": 55.0},
    ]
    text = bench_peers.ceiling_shares(records, own, theirs)
    assert records[1]["ceiling_percent"] == pytest.approx(100.0) and records[2]["ceiling_percent"] == pytest.approx(50)
    assert records[2]["ceilings"][bench_peers.TRANSFORMERS_STEP]["percent"] == pytest.approx(40)
    assert "ceiling" not in records[0]
    assert "1.10x one device = 100% with mpbook's own step, 80% with transformers' generate" in text
    assert "0.55x one device = 50% with mpbook's own step, 40% with transformers' generate" in text
    assert own.format() in text and theirs.format() in text


def test_the_command_line_reaches_the_peer_and_the_ceiling(monkeypatch):
    from mpbook import __main__ as cli

    seen = {}
    monkeypatch.setattr(bench_peers, "bench_against_transformers",
                        lambda prompts, **kw: seen.update(kw, prompts=prompts))
    assert cli.main(["bench", "--against", "transformers", "--batch", "3", "--window", "0.5", "--cpu"]) == 0
    assert seen["prompts"] == BENCH_PROMPTS[:3] and seen["window_s"] == 0.5 and seen["cpu"] is True
    args = cli.build_parser().parse_args(["bench"])
    assert args.window == 5.0 and args.against is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--against", "vllm"])
