"""How mpbook installs: an editable install imports from the folder above a clone of it.

A clone is a folder called ``mpbook`` holding the package ``mpbook/``. Jupyter started one
level up has that folder first on sys.path; Python takes it for a namespace package unless the
installed package is found by Python's own path search too (setuptools' import hook comes
after it), and ``%load_ext mpbook`` then says "The mpbook module is not an IPython extension".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_load_ext_works_from_the_folder_above_an_editable_clone(tmp_path):
    # A clone of the project, named as a clone is, installed editable into a site folder of
    # its own: the wheel setuptools builds from this pyproject.toml, unpacked as pip would.
    clone = tmp_path / "above" / "mpbook"
    clone.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, clone / name)
    shutil.copytree(ROOT / "mpbook", clone / "mpbook", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build = "from setuptools import build_meta; print(build_meta.build_editable(%r))" % str(wheels)
    done = subprocess.run([sys.executable, "-c", build], cwd=clone, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    site_dir = tmp_path / "site"
    with zipfile.ZipFile(wheels / done.stdout.split()[-1]) as wheel:
        wheel.extractall(site_dir)

    # Jupyter's kernel started in the folder above the clone: its directory comes first on sys.path.
    # (This checkout's own editable install, if any, is taken off the path: the copy is the one installed.)
    load = (
        "import os, site, sys\n"
        "sys.path[:] = [p for p in sys.path if os.path.realpath(p or '.') != %r]\n"
        "site.addsitedir(%r)\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        "print(shell.run_line_magic('load_ext', 'mpbook'))\n"
        "import mpbook; print(mpbook.__file__)\n"
        "print('mp' in shell.magics_manager.magics['line'])\n"
    ) % (str(ROOT), str(site_dir))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", load], cwd=clone.parent, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "not an IPython extension" not in done.stdout, done.stdout
    assert lines[-2] == str(clone / "mpbook" / "__init__.py") and lines[-1] == "True", done.stdout


def test_the_process_entry_point_runs_once_without_a_second_copy_of_itself():
    """Engines and the controller run ``python -m mpbook.cluster.launch``. Importing the package
    first must not import that module too: runpy then runs a second copy as __main__ and
    warns so in every engine's log ("found in sys.modules ... unpredictable behaviour")."""
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "mpbook.cluster.launch"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "found in sys.modules" not in done.stderr, done.stderr
    assert done.returncode == 1 and "usage: python -m mpbook.cluster.launch engine|controller" in done.stderr, done
