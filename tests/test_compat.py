"""The adapters in mpbook/compat against the libraries installed here.

Each ``verify()`` fails with a message naming the version it was checked against and what
changed; the tests below also use each adapter for real, so that a verify() that checks the
wrong thing cannot hide a break.
"""

from __future__ import annotations

import argparse
import importlib
import time

import pytest

from mpbook.compat import argparse as argparse_compat
from mpbook.compat import ipyparallel as ipp_compat
from mpbook.compat import ipywidgets as widgets_compat
from mpbook.compat import torch as torch_compat
from mpbook.compat import transformers as hf_compat


@pytest.mark.parametrize("library", ["ipyparallel", "argparse", "torch", "transformers", "ipywidgets"])
def test_the_installed_library_is_what_the_adapter_was_checked_against(library):
    importlib.import_module(f"mpbook.compat.{library}").verify()


def test_a_changed_library_fails_verify_with_a_message_naming_the_versions(monkeypatch):
    # What a release that renamed the private class would do to the argparse adapter.
    monkeypatch.delattr(argparse, "_SubParsersAction")  # noqa: private (the change being simulated)
    with pytest.raises(RuntimeError) as info:
        argparse_compat.verify()
    message = str(info.value)
    assert message.startswith(f"mpbook.compat.argparse was checked against Python {argparse_compat.CHECKED}; Python ")
    assert message.endswith("differs: argparse._SubParsersAction is gone")


def test_a_changed_ipyparallel_fails_verify_with_a_message(monkeypatch):
    from ipyparallel.client.asyncresult import AsyncResult

    monkeypatch.delattr(AsyncResult, "split")
    with pytest.raises(RuntimeError, match=r"checked against ipyparallel 9\.2; ipyparallel .* differs: AsyncResult\.split\(\) is gone"):
        ipp_compat.verify()


def test_a_changed_transformers_fails_verify_with_a_message(monkeypatch):
    import transformers

    # What a release that moved the head's pipeline plan off the CausalLM class would do.
    monkeypatch.setattr(transformers.MixtralForCausalLM, "_pp_plan", None)  # noqa: private (the change being simulated)
    with pytest.raises(RuntimeError, match=r"checked against transformers 5\.24; transformers .* differs: "
                                           r"MixtralForCausalLM\._pp_plan no longer names lm_head$"):
        hf_compat.verify()


def test_a_changed_ipywidgets_fails_verify_with_a_message(monkeypatch):
    import ipywidgets

    monkeypatch.setattr(ipywidgets.HTML, "add_class", lambda self, name: self)
    with pytest.raises(RuntimeError, match=r"checked against ipywidgets 8\.1; ipywidgets .* differs: "
                                           r"add_class\('mpbook-check'\) left the classes \(\)$"):
        widgets_compat.verify()


def test_argparse_adapter_lists_commands_and_options_of_the_magics_parser():
    from mpbook.magics import build_parser

    commands = argparse_compat.subcommands(build_parser())
    assert {"start", "status", "stop", "restart", "dashboard", "run", "data", "pipeline", "tensor"} <= set(commands)
    flags = {flag for action in argparse_compat.actions(commands["start"]) for flag in action.option_strings}
    assert {"-n", "--cpu", "--gpu", "--timeout", "--profile", "--cluster-id"} <= flags
    assert argparse_compat.subcommands(argparse.ArgumentParser()) == {}


ENGINE_STOP = """
import signal
from mpbook.compat.ipyparallel import engine_class

Engine = engine_class()
engine = Engine()  # never started: its SIGTERM handler has no kernel to stop
engine.init_signal()
assert not Engine.stopping
signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
print("stopping:", Engine.stopping)
"""


def test_the_engine_records_a_stop_asked_by_sigterm_and_still_runs_its_own_handler():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", ENGINE_STOP], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stopping: True"
    assert "received signal 15, stopping" in done.stderr  # ipyparallel's own handler ran too


def test_tensor_peak_counts_weights_inputs_and_the_largest_step():
    import torch

    layer = torch.nn.Linear(128, 128, bias=False).requires_grad_(False)  # as the engines load weights
    x = torch.ones(16, 128)
    with torch.inference_mode(), torch_compat.TensorPeak(layer, x) as peak:
        y = layer(x)
        for _ in range(3):  # the same module called again and again, as a decode loop does
            y = layer(y)
    weights, activation = 128 * 128 * 4, 16 * 128 * 4
    # the input stays alive; of the outputs, two at once (the new one before the old is freed)
    assert peak.bytes == weights + 3 * activation


def test_abort_without_a_process_group_does_nothing():
    import torch.distributed as dist

    assert not dist.is_initialized()
    torch_compat.abort_process_groups()
    assert not dist.is_initialized()


def _sleep_by_rank(state):
    import time

    time.sleep(0.1 if state.rank == 0 else 1.5)
    return state.rank


@pytest.mark.cluster
def test_ipyparallel_adapter_reads_per_target_output_and_waits_for_some_targets(workbench):
    result = workbench.client[workbench.engine_ids()].execute("print('out', rank)", silent=False, block=False)
    result.wait(30)
    result.wait_for_output(5)
    metadata = ipp_compat.target_metadata(result)
    assert [md["stdout"] for md in metadata] == ["out 0\n", "out 1\n"]

    from mpbook.engine import group

    result = workbench.client[workbench.engine_ids()].apply_async(group.call, _sleep_by_rank)
    began = time.monotonic()
    assert ipp_compat.wait_for_targets(result, [0], timeout_s=20)  # rank 0 is done long before rank 1
    assert not result.ready()
    assert not ipp_compat.wait_for_targets(result, [1], timeout_s=0.1)
    assert ipp_compat.wait_for_targets(result, [0, 1], timeout_s=20)
    assert time.monotonic() - began >= 1.4
    assert result.get() == [0, 1]
