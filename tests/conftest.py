"""Shared fixtures: real ipyparallel engines (CPU, gloo), shared where a test does not need
its own, and one private temporary folder for everything the test session writes.

Tests that start engines, kernels or other clusters are marked ``cluster`` (those that use a
cluster fixture are marked here, automatically); ``pytest -m "not cluster"`` runs the rest,
the pure logic, in seconds.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

# Everything the session and the processes it starts (engines, kernels, `ipcluster`) write
# to a temporary folder lands in one folder, removed at the end: IPython profiles,
# connection files and engine logs (IPYTHONDIR), the built-in models (MPBOOK_CACHE), the
# engines' rendezvous folders (TMPDIR). Set before anything imports IPython; children
# inherit it.
# A process that imports this module again (an engine unpickling a test's function imports
# its test module) finds the folder in its environment and leaves everything as it is.
OWNER = "MPBOOK_TEST_ROOT" not in os.environ
ROOT = os.environ.get("MPBOOK_TEST_ROOT") or tempfile.mkdtemp(prefix="mpbook-test-")
if OWNER:
    for name in ("ipython", "cache", "tmp"):
        os.mkdir(os.path.join(ROOT, name))
    os.environ.update(
        MPBOOK_TEST_ROOT=ROOT,
        IPYTHONDIR=os.path.join(ROOT, "ipython"),
        MPBOOK_CACHE=os.path.join(ROOT, "cache"),
        TMPDIR=os.path.join(ROOT, "tmp"),
    )
    tempfile.tempdir = None  # this process, too, asks TMPDIR again
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nothing downloads models in the tests: the notebooks' suggested model is then the preset.
os.environ["HF_HUB_OFFLINE"] = "1"
# jsonschema (under nbformat, which the notebook tests use) imports the optional
# rfc3987-syntax checker when it is installed, and that builds 38 parser grammars at import:
# about 5 s in every test process. Notebook schemas use no IRI formats; jsonschema skips the
# checker when its import fails.
sys.modules.setdefault("rfc3987_syntax", None)
# Functions that tests send to engines are pickled by reference to their test module, so
# the engines (which inherit this environment) must be able to import it.
_here = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_here, os.environ.get("PYTHONPATH")) if p)

import cluster_probe  # noqa: E402
import pytest  # noqa: E402

from mpbook import Workbench  # noqa: E402

# Fixtures that start engines, a kernel or an outside cluster: a test using one (directly or
# through another fixture) is a `cluster` test; so is every `browser` test (JupyterLab, a
# kernel and its cluster).
CLUSTER_FIXTURES = {"workbench", "wb4", "ipcluster", "mpi_ipcluster", "kernel", "gpu_wb", "wb", "gloo_workbench"}
CLUSTER_MARKERS = {"browser", "gpu"}


def pytest_collection_modifyitems(config, items):
    from mpbook.devices import visible_gpu_count

    no_gpu = visible_gpu_count() == 0
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())) or CLUSTER_MARKERS & set(item.keywords):
            item.add_marker(pytest.mark.cluster)
        if no_gpu and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine"))
        if "conformance" in item.keywords and "conformance" not in (config.option.markexpr or ""):
            # Not in the default run: it takes many minutes. (An addopts `-m` would be replaced by
            # any `-m` on the command line, `-m cluster` would then run it.)
            item.add_marker(pytest.mark.skip(reason="the whole conformance sweep runs with `pytest -m conformance`"))
    # The tests on four engines side by side, so that one worker runs them all on one cluster.
    four = [item for item in items if "wb4" in getattr(item, "fixturenames", ())]
    if four:
        first, chosen = items.index(four[0]), {id(item) for item in four}
        rest = [item for item in items if id(item) not in chosen]
        items[:] = rest[:first] + four + rest[first:]


@pytest.fixture(autouse=True)
def _no_engines_outside_cluster_tests(request, monkeypatch):
    """A test that is not marked `cluster` must not start engines: it would make
    ``-m "not cluster"`` slow without anyone noticing. Starting one fails it instead."""
    if "cluster" in request.node.keywords:
        return
    from mpbook.cluster.lifecycle import Cluster

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts a cluster: mark it @pytest.mark.cluster")

    monkeypatch.setattr(Cluster, "_launch", refuse)
    monkeypatch.setattr(Cluster, "_form_group", refuse)


# ----------------------------------------------------------------------------- clusters
@pytest.fixture(scope="session")
def workbench():
    """Two CPU engines (collectives over MPI when it is installed, as in a user's default
    start), shared by every test (and module fixture) that asks for it, started on first use.

    A test may load models, fail cells, break the process group or even stop it: after each
    test the workbench is checked and, if needed, restarted in place, so the next test gets
    it whole. A test that needs its own engines (it kills or stops them, or wants other
    options) starts its own cluster and is marked ``cluster``."""
    wb = Workbench.start(2, cpu=True)
    yield wb
    wb.stop()


@pytest.fixture(scope="session")
def gloo_workbench():
    """Two CPU engines whose collectives go over gloo: the transport where MPI is missing."""
    wb = Workbench.start(2, cpu=True, transport="gloo")
    yield wb
    wb.stop()


@pytest.fixture(scope="session")
def wb4():
    """Four CPU engines, for the layouts that combine two degrees; shared like ``workbench``."""
    wb = Workbench.start(4, cpu=True)
    yield wb
    wb.stop()


def _all_reduce(state):
    import torch
    import torch.distributed as dist

    t = torch.tensor([state.rank + 1.0])
    dist.all_reduce(t)
    return t.item()


def whole(wb: Workbench) -> bool:
    """Whether every rank answers and the process group works."""
    if wb.stopped:
        return False
    try:
        wb.cluster.check_running("the next test")
        expected = [float(wb.world_size * (wb.world_size + 1) // 2)] * wb.world_size
        return wb.apply(_all_reduce, stream=False) == expected
    except Exception:
        return False


@pytest.fixture(autouse=True)
def _heal_the_shared_workbenches(request):
    shared = [request.getfixturevalue(name) for name in ("workbench", "wb4", "gloo_workbench")
              if name in request.fixturenames]
    yield
    for wb in shared:
        if not whole(wb):
            wb.restart()


SHORT_TIMEOUT_S = 3.0


def _pack_from_elements(state, elements: int) -> int:
    from mpbook.models import weight_order

    before, weight_order.PACKED_FROM_ELEMENTS = weight_order.PACKED_FROM_ELEMENTS, elements
    return before


@pytest.fixture
def engines_pack_every_weight(workbench):
    """The shared engines pack every Linear weight that they can, however small, while the test
    runs (the tiny preset's weights are all under the size from which they pack)."""
    before = workbench.apply(_pack_from_elements, 0, stream=False)[0]
    try:
        yield
    finally:
        workbench.apply(_pack_from_elements, before, stream=False)


@pytest.fixture(scope="module")
def short_timeout(workbench):
    """The shared workbench with collectives that give up after SHORT_TIMEOUT_S, for one module."""
    with cluster_probe.collective_timeout(workbench, SHORT_TIMEOUT_S):
        yield workbench


@pytest.fixture
def shell():
    """A real IPython shell with the mpbook extension loaded; its cluster stops afterwards."""
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "mpbook")
    yield sh
    magics = sh.magics_manager.registry["MpMagics"]
    magics.close()


@pytest.fixture
def shared_shell(shell, workbench):
    """The shell, its magics using the shared workbench as if `%mp start` had started it
    (left running afterwards: the next test gets it)."""
    magics = shell.magics_manager.registry["MpMagics"]
    magics.workbench = workbench
    yield shell
    if magics.workbench is workbench:
        magics.workbench = None  # so that close() leaves it running


# ----------------------------------------------------------------------------- models
@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The tiny Llama-family model (GQA, tied embeddings, RoPE), saved with save_pretrained."""
    from mpbook.models import build_tiny

    return str(build_tiny(tmp_path_factory.mktemp("tiny-llama"), seed=1))


@pytest.fixture(scope="session")
def qwen2_folder(tmp_path_factory):
    """A tiny Qwen2: q/k/v biases (drawn random too), untied LM head, 2 KV heads."""
    from transformers import Qwen2Config

    from mpbook.models import save_random
    from mpbook.models.tokenizer import TOKENIZER_IDS

    config = Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **TOKENIZER_IDS,
    )
    return str(save_random(config, tmp_path_factory.mktemp("tiny-qwen2"), seed=2))


# ----------------------------------------------------------------------------- the end
def mpi_shared_memory() -> set[str]:
    import glob

    from mpbook.cluster.transport import MPICH_SHARED_MEMORY

    return set(glob.glob(MPICH_SHARED_MEMORY + "*"))


SHARED_MEMORY_BEFORE = mpi_shared_memory() if OWNER else set()


def mapped_anywhere(paths: set[str]) -> set[str]:
    """Those of ``paths`` that some process maps (a world of MPI still running)."""
    import psutil

    from mpbook.cluster.transport import mpi_shared_memory_files

    return paths & mpi_shared_memory_files(psutil.pids()) if paths else set()


def leftovers() -> list[str]:
    """What the session left that it should not have: mpbook's folders in the session's
    temporary folder (a rendezvous folder whose rank 0 did not remove it, for example), and
    MPICH's shared-memory files of MPI worlds that have ended (a stale one can be opened by a
    later world that comes to the same name)."""
    tmp = os.path.join(ROOT, "tmp")
    folders = [os.path.join(tmp, name) for name in os.listdir(tmp) if name.startswith("mpbook-")]
    new = mpi_shared_memory() - SHARED_MEMORY_BEFORE
    stale = new - mapped_anywhere(new)
    for path in stale:
        os.unlink(path)
    return sorted(folders + list(stale))


@pytest.hookimpl(trylast=True)  # after the session's fixtures have stopped their clusters
def pytest_sessionfinish(session, exitstatus):
    if not OWNER:
        return
    from IPython.core.interactiveshell import InteractiveShell

    if InteractiveShell.initialized():
        # What IPython would do at exit (close its history database), now, while the folder
        # still exists; and only now.
        shell = InteractiveShell.instance()
        shell.atexit_operations()
        atexit.unregister(shell.atexit_operations)
    left = leftovers()
    shutil.rmtree(ROOT, ignore_errors=True)
    if os.path.exists(ROOT):
        left.append(ROOT)
    if left and getattr(session.config, "workerinput", None) is None:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"the test session left these behind (removed now): {', '.join(left)}", red=True)
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
