"""Shared fixtures: real ipyparallel engines (CPU, gloo) and a private IPython directory."""

from __future__ import annotations

import os
import tempfile

# Profiles, connection files and engine logs of the test clusters go to a private folder,
# set before anything imports IPython; engines and `ipcluster` inherit it.
os.environ["IPYTHONDIR"] = tempfile.mkdtemp(prefix="mpbook-test-ipython-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nothing downloads models in the tests: the notebooks' suggested model is then the preset.
os.environ["HF_HUB_OFFLINE"] = "1"
# The built-in tiny model is built into this folder (once per test session), not ~/.cache.
os.environ["MPBOOK_CACHE"] = tempfile.mkdtemp(prefix="mpbook-test-cache-")
# Functions that tests send to engines are pickled by reference to their test module, so
# the engines (which inherit this environment) must be able to import it.
_here = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_here, os.environ.get("PYTHONPATH")) if p)

import pytest  # noqa: E402

from cluster_probe import alive  # noqa: E402,F401  (tests import it from here)
from mpbook import Workbench  # noqa: E402


def pytest_collection_modifyitems(config, items):
    from mpbook.devices import visible_gpu_count

    if visible_gpu_count() == 0:
        skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def workbench():
    """Two CPU engines with a gloo process group, shared by the tests of one module."""
    with Workbench.start(2, cpu=True) as wb:
        yield wb


@pytest.fixture
def shell():
    """A real IPython shell with the mpbook extension loaded; its cluster stops afterwards."""
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "mpbook")
    yield sh
    magics = sh.magics_manager.registry["MpMagics"]
    magics.close()


def process_tree(wb: Workbench) -> list[int]:
    """Every process the workbench started, children (nannies) included."""
    from mpbook.cluster.lifecycle import _process_trees

    return [p.pid for p in _process_trees(wb.pids())]


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
