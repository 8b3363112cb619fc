"""The %mp / %%mp magics through a real IPython shell."""

from __future__ import annotations

import os

import psutil
import pytest
from IPython.core.error import UsageError

from cluster_probe import alive, gone_within, process_tree, snapshot
from mpbook.magics import parse


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.cluster
def test_start_run_status_stop(shell, capsys):
    result = shell.run_cell("%mp start -n 2 --cpu")
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out
    assert "started 2 engines" in out and "gloo" in out
    wb = shell.magics_manager.registry["MpMagics"].workbench
    first = process_tree(wb)

    result = shell.run_cell("%%mp run\nt = torch.tensor([rank + 1.0])\ndist.all_reduce(t)\nprint('sum', t.item())")
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out
    assert "[rank 0] sum 3.0" in out and "[rank 1] sum 3.0" in out

    result = shell.run_cell("%%mp run --ranks 0\nprint(rank, world_size, device, mesh.coords)")
    assert result.success, result.error_in_exec
    assert "[rank 0] 0 2 cpu Coords(dp=0, pp=0, ep=0, tp=0)" in capsys.readouterr().out

    assert shell.run_cell("%mp status").success
    assert capsys.readouterr().out.count("gloo") == 2

    # (`%mp restart`: test_reliability's killed-engine test restarts through the magic)
    snap = snapshot(wb)
    assert shell.run_cell("%mp stop").success
    assert alive(first) == []
    assert gone_within(snap, 0) == ([], [])  # no process, no listening port
    assert not os.path.exists(snap["rendezvous_dir"])
    assert shell.magics_manager.registry["MpMagics"].workbench is None


def test_error_on_one_rank_is_raised_in_the_notebook_with_its_rank(shared_shell, capsys):
    shell = shared_shell
    result = shell.run_cell("%%mp run\nif rank == 0:\n    1 / 0\nprint('ok', rank)")
    assert type(result.error_in_exec).__name__ == "RankError"
    assert result.error_in_exec.ranks == [0]
    captured = capsys.readouterr()
    shown = captured.out + captured.err
    assert "[rank 0] ZeroDivisionError: division by zero" in shown
    assert "[rank 1] ok 1" in shown
    # still usable
    assert shell.run_cell("%%mp run\nprint('fine', rank)").success
    assert "[rank 0] fine 0" in capsys.readouterr().out


@pytest.mark.parametrize(
    "cell, message",
    [
        ("%mp start -n 0", "at least one engine"),
        ("%mp start --frob", "unrecognized arguments: --frob"),
        ("%mp start -n two", "argument -n: 'two': give a whole number, e.g. -n 2"),
        ("%mp start --cpu --gpu", "not allowed with argument"),
        ("%mp start --profile no-such-profile", "no IPython profile of that name"),
        ("%mp launch", "invalid choice: 'launch'"),
        ("%mp run", "needs a cell: write `%%mp run`"),
        ("%%mp start\nprint()", "is a line command"),
        ("%%mp run\nprint(rank)", "no cluster is running: start one with `%mp start`"),
        ("%mp status", "no cluster is running"),
        ("%mp start 'unclosed", "No closing quotation"),
    ],
)
def test_bad_input_is_a_one_line_usage_error_and_starts_nothing(shell, capsys, cell, message):
    before = _children()
    result = shell.run_cell(cell)
    assert isinstance(result.error_in_exec, UsageError)
    assert message in str(result.error_in_exec)
    assert "\n" not in str(result.error_in_exec)
    assert "Traceback" not in capsys.readouterr().err
    assert alive(_children() - before) == []


def test_a_second_start_is_refused_and_keeps_the_first(shared_shell):
    shell = shared_shell
    result = shell.run_cell("%mp start -n 2 --cpu")
    assert isinstance(result.error_in_exec, UsageError)
    assert "already running (2 engines on cpu)" in str(result.error_in_exec)
    assert shell.run_cell("%%mp run\nprint(rank)").success


def test_bad_ranks_name_the_valid_ones(shared_shell):
    shell = shared_shell
    result = shell.run_cell("%%mp run --ranks 3\nprint(rank)")
    assert isinstance(result.error_in_exec, UsageError)
    assert "ranks 0-1 (2 engines); rank 3 does not exist" in str(result.error_in_exec)


def test_parse_distinguishes_line_and_cell_commands():
    args = parse("start -n 3 --cpu --timeout 5", cell=False)
    assert (args.command, args.n, args.cpu, args.timeout) == ("start", 3, True, 5.0)
    assert parse("run --ranks 0,1", cell=True).ranks == "0,1"


@pytest.mark.parametrize(
    "line, message",
    [
        ("tensor --temprature 0.7", "unrecognized arguments: --temprature 0.7; did you mean --temperature?; "
                                    "`%mp tensor --help` lists its options"),
        ("data --temprature=0.7 --max-new-tokns 3", "did you mean --temperature or --max-new-tokens?"),
        ("pipeline --micro-batches 2", "did you mean --microbatches?"),  # (a prefix would be taken as it)
        ("tensor --sed 3", "did you mean --seed?"),
        ("start --frob", "unrecognized arguments: --frob; `%mp start --help` lists its options"),
        # an option of another command is named as that, not as a likeness
        ("restart -n 2", "unrecognized arguments: -n 2; -n is an option of `%mp start`"),
        ("run --model tiny", "--model is an option of `%mp data`"),
        ("tensro --tp 2", "invalid choice: 'tensro'"),
        ("tensro --tp 2", "did you mean `%mp tensor`?"),
        ("launch", "`%mp?` lists the commands"),
    ],
)
def test_a_typo_names_what_was_meant(line, message):
    with pytest.raises(UsageError) as info:
        parse(line, cell=True)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert "--help?" not in str(info.value)


def test_strategy_cells_generate_and_store_the_result(shared_shell, capsys, tiny_folder):
    from mpbook.reference import reference

    shell = shared_shell
    cell = f"%%mp tensor --model {tiny_folder} --max-new-tokens 5\nExplain pipeline parallelism.\nHi\n"
    result = shell.run_cell(cell)
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out
    assert "[0] Explain pipeline parallelism." in out and "[1] Hi" in out
    assert "tensor (dp=1 x pp=1 x tp=2) on 2 engines:\n" in out and "decode" in out
    mp = shell.user_ns["_mp"]
    _, tokens = reference(tiny_folder, ["Explain pipeline parallelism.", "Hi"], max_new_tokens=5)
    assert mp.token_ids == tokens
    assert mp.collectives[0]["all_reduce"] > 0

    shell.user_ns["questions"] = ["What is a micro-batch?", "Why a bubble?", "a", "b"]
    result = shell.run_cell(f"%mp pipeline --model {tiny_folder} --prompts questions --microbatches 2 -o piped")
    assert result.success, result.error_in_exec
    piped = shell.user_ns["piped"]
    assert piped.layout.pp == 2 and len(piped.texts) == 4
    assert "(the result is in `piped`)" in capsys.readouterr().out

    # a long generation prints a preview of each text; the result keeps all of it
    result = shell.run_cell(f"%mp data --model {tiny_folder} --prompts questions --max-new-tokens 200 -o long")
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out
    long = shell.user_ns["long"]
    cut = [i for i, text in enumerate(long.texts) if len(text) > 160]
    assert cut  # (a row that ends early is shorter: after end-of-sequence it pads)
    for i, text in enumerate(long.texts):
        if i in cut:
            assert f"{text[:160]!r} ... ({len(text) - 160} more characters in `long.texts[{i}]`)" in out
        else:
            assert f"-> {text!r}\n" in out


@pytest.mark.parametrize(
    "cell, message",
    [
        ("%%mp tensor --tp 3\nhi", "but 2 engines are up"),
        ("%%mp pipeline --microbatches 0\nhi", "use at least 1"),
        ("%mp data --prompts nothing_here", "no variable of that name"),
        ("%%mp data --prompts nothing_here\nhi", "either in the cell or with --prompts"),
        ("%mp data", "needs a cell"),
        ("%%mp pipeline --stages 4,x\nhi", "--stages 4,x"),
        ("%%mp data --dtype float8\nhi", "choose one of float32, bfloat16, float16"),
    ],
)
def test_bad_strategy_input_is_one_line(shared_shell, cell, message):
    result = shared_shell.run_cell(cell)
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    assert message in str(result.error_in_exec)
    assert "\n" not in str(result.error_in_exec)
