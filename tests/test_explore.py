"""mpbook.explore on real engines: controls, predictions that move with them, runs that add rows."""

from __future__ import annotations

import pytest

import mpbook
from mpbook.errors import MpbookError


@pytest.fixture(scope="module")
def explorer(workbench):
    return mpbook.explore("tiny", engines=workbench, batch=4, new_tokens=6, log=lambda _: None)


def test_offers_the_degrees_the_model_allows_and_starts_data_parallel(explorer):
    assert {d: explorer.controls[d].value for d in ("dp", "pp", "tp", "ep")} == {"dp": 2, "pp": 1, "tp": 1, "ep": 1}
    assert list(explorer.controls["tp"].options) == [1, 2]
    assert list(explorer.controls["ep"].options) == [1]  # tiny has no experts
    assert explorer.controls["microbatches"].disabled  # no pipeline, no micro-batches
    assert explorer.prediction.speed is not None and explorer.problem is None
    with pytest.raises(MpbookError, match=r"tp=3: not offered for 'tiny' on 2 engines; choose one of \[1, 2\]"):
        explorer.set(tp=3)


def test_moving_a_control_completes_the_layout_and_changes_the_prediction_without_the_engines(explorer, workbench):
    explorer.set(dp=2)
    before = explorer.prediction.speed.decode_tokens_per_s
    calls = workbench.calls.apply
    workbench.calls.apply = None  # any engine call would fail now
    try:
        explorer.set(tp=2)
        assert (explorer.controls["dp"].value, explorer.controls["tp"].value) == (1, 2)
        after = explorer.prediction.speed.decode_tokens_per_s
        assert after != before
        assert f"{after:,.0f}" in explorer.prediction_view.value
        explorer.set(pp=2)
        assert explorer.choice()["tp"] == 1 and not explorer.controls["microbatches"].disabled
        assert [v for _, v in explorer.controls["microbatches"].options] == [0, 1, 2, 3, 4]
        explorer.set(microbatches=4)
        assert explorer.prediction.workload.microbatches == 4
        explorer.set(batch=64)  # does not fit? it does on a CPU host; the bars follow
        assert "rank 1" in explorer.memory_bars.value
    finally:
        workbench.calls.apply = calls
    explorer.set(batch=4, dp=2)


def test_a_run_adds_a_row_with_prediction_and_measurement(explorer):
    explorer.set(dp=1, tp=2)
    result = explorer.run()
    assert result.layout == explorer.prediction.layout
    (row,) = [r for r in explorer.rows if r["layout"] == str(result.layout)]
    assert row["measured_tok_s"] == pytest.approx(result.decode_tokens_per_s, rel=1e-3)
    assert row["predicted_tok_s"] > 0 and row["error"] == pytest.approx(
        row["predicted_tok_s"] / row["measured_tok_s"] - 1, abs=2e-3)
    # Memory as exact as the planner: the weights and KV cache each rank holds.
    assert row["measured_weights_kv_bytes"] == row["predicted_weights_kv_bytes"]
    assert set(row["measured_step_ms"]) >= {"compute", "collectives", "host"}
    assert str(result.layout) in explorer.table_view.value
    assert bytes(explorer.plot_view.value).startswith(b"\x89PNG")
    assert explorer.table[-1]["layout"] == str(result.layout)


def test_an_invalid_choice_disables_run_with_the_reason(explorer):
    explorer.set(dp=2, batch=1)  # 2 replicas, 1 prompt
    assert explorer.run_button.disabled
    assert "dp=2 > 1 prompt" in explorer.status.value or "replica" in explorer.status.value
    with pytest.raises(MpbookError, match="cannot run this choice"):
        explorer.run()
    explorer.set(batch=4)
    assert not explorer.run_button.disabled


def test_explore_needs_a_running_cluster():
    with pytest.raises(MpbookError, match="needs a running cluster"):
        mpbook.explore("tiny", engines=2)


def test_explore_in_a_notebook_finds_the_cluster_mp_start_started(shared_shell, workbench):
    shared_shell.run_cell("import mpbook\npanel = mpbook.explore('tiny', batch=2, new_tokens=4, log=None)",
                          silent=True).raise_error()
    panel = shared_shell.user_ns["panel"]
    assert panel.engines is workbench and panel.prediction.speed is not None


def test_explore_without_a_cluster_says_how_to_start_one(shell):
    with pytest.raises(MpbookError, match=r"%mp start -n 2 in this notebook, or engines=Workbench.start\(2\)"):
        mpbook.explore("tiny")
