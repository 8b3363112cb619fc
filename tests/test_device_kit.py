"""The device kit's CPU side: tools/gather_wheels.py, tools/device-check.sh, tools/device_check.py.

The device machine (one GPU, Python 3.12 with torch and transformers, no Jupyter stack, no
network) gets one prepared call. What can go wrong before a GPU is involved is tested here,
for real: the wheels gathered from PyPI for this machine's Python, installed without an index
into a fresh environment that holds only what the device machine has (its package list,
tools/device-target.txt, taken from this machine's own installation), then the device script
itself run there on a CPU engine, to its report.

The test marked ``network`` downloads the wheels from PyPI (a package registry; nothing else).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))

import device_check  # noqa: E402
import gather_wheels  # noqa: E402

# The stand-in for the 7B model in the CPU run, and what a decode step of it reads, by hand:
# per layer q, k, v, o 4 x 64 x 64 = 16,384, the MLP 3 x 64 x 160 = 30,720, two norms 128:
# 47,232; two layers 94,464; embedding and head 1000 x 64 each, the final norm 64: 222,528
# parameters. In bf16 that is 445,056 bytes, of which a step reads all but the input
# embedding's 128,000: 317,056.
TINY_PARAMETERS = 222_528
TINY_BYTES_PER_STEP = 317_056
CPU_ARGS = ("--cpu --model-shape tiny --families tiny --modes eager,compile --batches 1,2 --new-tokens 4 --repeats 1 "
            "--copy-mib 16 --copy-repeats 3")


# ----------------------------------------------------------------------------- arithmetic
def test_the_roofline_of_a_7b_llama_worked_by_hand():
    import torch
    from transformers import AutoModelForCausalLM

    config = device_check.llama_config("7b")
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    # Llama 2 7B: 32 x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + 2 x 32000 x 4096 + 4096
    assert parameters == 6_738_415_616
    per_step = device_check.decode_bytes_per_step(config, 2 * parameters, 2)
    assert per_step == 2 * 6_738_415_616 - 2 * 32000 * 4096 == 13_214_687_232
    roofline = device_check.Roofline(per_step, 4.3e12)  # bytes per second
    assert roofline.step_seconds == pytest.approx(3.07318e-3, rel=1e-5)
    assert roofline.tokens_per_s(1) == pytest.approx(325.39, rel=1e-4)
    assert roofline.tokens_per_s(8) == pytest.approx(2603.1, rel=1e-4)


def test_a_tied_head_is_read_whole_every_step():
    from transformers import AutoConfig

    from mpbook.models.presets import build_preset

    tiny = AutoConfig.from_pretrained(build_preset("tiny"))  # the preset ties its embedding and head
    assert tiny.tie_word_embeddings
    assert device_check.decode_bytes_per_step(tiny, 1000, 4) == 1000
    untied = device_check.llama_config("tiny")
    assert device_check.decode_bytes_per_step(untied, 2 * TINY_PARAMETERS, 2) == TINY_BYTES_PER_STEP


# ----------------------------------------------------------------------------- the wheel list
def test_the_target_list_and_what_is_downloaded_for_it():
    target = gather_wheels.Target.read()
    assert target.installed["torch"] == "2.11.0" and target.installed["pytest"] is None
    assert "ipyparallel" not in target.installed and "ipykernel" not in target.installed
    resolved, pinned = gather_wheels.to_download(gather_wheels.project_requirements(target), target)
    names = {gather_wheels.canonicalize_name(gather_wheels.Requirement(r).name) for r in resolved}
    # what mpbook needs and the device machine lacks; nothing it has, nothing left out on purpose
    assert {"ipyparallel", "ipywidgets", "ipykernel", "mpich", "nbclient", "nbformat"} <= names
    assert not names & set(target.installed) and not names & set(gather_wheels.LEFT_OUT)
    assert pinned == [f"transformers=={metadata.version('transformers')}"]


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A real (empty) wheel declaring ``requires``."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_the_check_names_what_neither_the_wheels_nor_the_target_provide(tmp_path):
    target = gather_wheels.Target.read()
    _wheel(tmp_path, "carried_one", "1.0", ["numpy>=3", "no-such-package", "torch>=2.0", "regex>=2025.1",
                                            "other-carried>=2", "pywin32; sys_platform == 'win32'"])
    _wheel(tmp_path, "other_carried", "1.5", [])
    problems, notes = gather_wheels.check(tmp_path, target)
    assert problems == [
        "carried_one-1.0-py3-none-any.whl needs numpy>=3; the device machine has numpy 2.5.2: carry a wheel",
        "carried_one-1.0-py3-none-any.whl needs no-such-package: neither carried nor on the device machine",
        "carried_one-1.0-py3-none-any.whl needs other-carried>=2; the device machine has other-carried 1.5: "
        "carry a wheel",
    ]
    assert notes == ["carried_one-1.0-py3-none-any.whl needs regex>=2025.1; the device machine's version is not listed"]
    _wheel(tmp_path, "other_carried", "2.0", [])
    assert "two wheels of other-carried: keep one" in gather_wheels.check(tmp_path, target)[0]


# ----------------------------------------------------------------------------- the script
def test_the_device_script_parses_and_names_what_exists():
    done = subprocess.run(["bash", "-n", str(TOOLS / "device-check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    script = (TOOLS / "device-check.sh").read_text()
    assert gather_wheels.DEFAULT_DEST.name in script and "tools/device_check.py" in script
    # the call the README gives is the one the script says
    call = gather_wheels.DEVICE_CALL
    assert call in script and call in (ROOT / "README.md").read_text()


def _link_target_packages(site: Path, target: gather_wheels.Target, carried: set[str]) -> list[str]:
    """Make ``site`` hold, as links into this machine's installation, every distribution of the
    device machine's list that is installed here, except those the wheels carry, and what this
    machine's versions of them need (its huggingface_hub is newer than the device machine's and
    needs a package the list has not); returns their names."""
    from packaging.requirements import Requirement

    wanted = [name for name in sorted(target.installed) if name not in carried]
    linked = []
    while wanted:
        name = wanted.pop(0)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if name in linked:
            continue
        base = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops - {"__pycache__"}):
            if top.endswith(".pth") or not (base / top).exists() or (site / top).exists():
                continue
            (site / top).symlink_to(base / top)
        linked.append(name)
        needs = [Requirement(r) for r in dist.requires or []]
        wanted += [gather_wheels.canonicalize_name(r.name) for r in needs
                   if (r.marker is None or r.marker.evaluate({"extra": ""}))
                   and gather_wheels.canonicalize_name(r.name) not in carried]
    return linked


@pytest.fixture
def device_run(tmp_path_factory):
    """A copy of the project; the wheels gathered for this machine's Python into its
    .device-wheels; a fresh virtual environment that sees only the device machine's packages;
    tools/device-check.sh run in it on a CPU engine."""
    base = tmp_path_factory.mktemp("device-kit")
    project = base / "mpbook"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    for folder in ("mpbook", "tools", "tests"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))

    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    gathered = subprocess.run([sys.executable, str(project / "tools" / "gather_wheels.py"), "--python-version",
                               python_version, "--dest", str(project / ".device-wheels")],
                              capture_output=True, text=True, timeout=600)
    assert gathered.returncode == 0, gathered.stdout[-3000:] + gathered.stderr[-3000:]

    target = gather_wheels.Target.read(python_version)
    carried = {gather_wheels.wheel_name(p) for p in (project / ".device-wheels").glob("*.whl")}
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    provided = base / "device-machine-packages"
    provided.mkdir()
    linked = _link_target_packages(provided, target, carried)
    (site / "device_machine.pth").write_text(f"{provided}\n")

    out = base / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OUT=str(out), PYTHON=str(python), DEVICE_CHECK_ARGS=CPU_ARGS,
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    script = subprocess.run(["bash", str(project / "tools" / "device-check.sh")], cwd=base, env=env,
                            capture_output=True, text=True, timeout=900)
    return dict(project=project, python=python, env=env, out=out, script=script, gathered=gathered,
                carried=carried, linked=linked, base=base)


@pytest.mark.network
@pytest.mark.cluster
def test_the_wheels_complete_mpbook_and_the_device_script_runs_there_on_a_cpu(device_run):
    """One test, not two: pytest-xdist would build the environment once per worker."""
    _the_wheels_complete_mpbook(device_run)
    _the_device_script_runs_to_its_report(device_run)


def _the_wheels_complete_mpbook(device_run):
    assert {"ipyparallel", "ipykernel", "ipywidgets", "mpich", "transformers"} <= device_run["carried"]
    assert "torch" in device_run["linked"] and "torch" not in device_run["carried"]
    python, env = str(device_run["python"]), device_run["env"]
    run = functools.partial(subprocess.run, capture_output=True, text=True, env=env, cwd=device_run["base"])
    # The environment holds only the linked packages, the wheels and mpbook (from the copy).
    where = run([python, "-c", "import mpbook, ipyparallel, torch; print(mpbook.__file__); "
                 "print(ipyparallel.__file__); print(torch.__file__)"])
    assert where.returncode == 0, where.stderr
    mpbook_file, ipp_file, torch_file = where.stdout.split()
    assert mpbook_file == str(device_run["project"] / "mpbook" / "__init__.py")
    assert ipp_file.startswith(str(device_run["python"].parent.parent)), ipp_file  # installed from a wheel
    assert not ipp_file.startswith(sys.prefix)
    # pip's check (of what is installed, extras aside): of mpbook and the wheels, only what was
    # left out on purpose is missing
    check = run([python, "-m", "pip", "check"])
    ours = {"mpbook", *device_run["carried"]}
    complaints = [line for line in check.stdout.splitlines()
                  if gather_wheels.canonicalize_name(line.split(" ")[0]) in ours]
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    left_out = [name for name in gather_wheels.LEFT_OUT
                if name in {gather_wheels.Requirement(r).name for r in dependencies}]
    assert left_out == ["jupyterlab"]
    assert complaints == [f"mpbook 0.1.0 requires {name}, which is not installed." for name in left_out], check.stdout
    # every module of mpbook imports there, and the command line answers
    every = ("import importlib, pkgutil, mpbook\n"
             "names = [m.name for m in pkgutil.walk_packages(mpbook.__path__, 'mpbook.')]\n"
             "for name in names: importlib.import_module(name)\n"
             "print(len(names))")
    imported = run([python, "-c", every])
    assert imported.returncode == 0 and int(imported.stdout) > 50, imported.stderr[-3000:]
    helped = run([python, "-m", "mpbook", "--help"])
    assert helped.returncode == 0 and "bench" in helped.stdout, helped.stderr


def _the_device_script_runs_to_its_report(device_run):
    script, out = device_run["script"], device_run["out"]
    assert script.returncode == 0, script.stdout[-4000:] + script.stderr[-4000:]
    assert "installing" in script.stdout and "carried wheels" in script.stdout
    # the gpu-marked tests were collected there and skipped for want of a GPU, with that reason
    tests_log = (out / "gpu-tests.log").read_text()
    assert "skipped" in tests_log and "failed" not in tests_log and "error" not in tests_log.lower(), tests_log
    report = json.loads((out / "device-check.json").read_text())
    assert report["failures"] == []
    assert any("the tests marked gpu (test_gpu.py" in note and "skipped" in note for note in report["notes"])
    verdicts = {c["strategy"]: c["verdict"] for c in report["strategies"] if c["model"] == "tiny"}
    assert verdicts["data"] == verdicts["pipeline"] == verdicts["tensor"] == "yes"
    assert verdicts["expert"].startswith("refused: ") and "expert-parallel plan" in verdicts["expert"]
    assert report["model"]["parameters"] == TINY_PARAMETERS
    assert report["model"]["bytes_per_step"] == TINY_BYTES_PER_STEP
    bandwidth = report["bandwidth"]
    rows = {(r["mode"], r["batch"]): r for r in report["decode"]}
    assert set(rows) == {("eager", 1), ("eager", 2), ("compile", 1), ("compile", 2)}
    for (mode, batch), row in rows.items():
        assert row["verdict"] == "ran" and row["median"] > 0 and len(row["decode_tokens_per_s"]) == 1
        assert (row["compile_s"] > 0) if mode == "compile" else row["compile_s"] is None
        assert row["roofline_tokens_per_s"] == pytest.approx(batch * bandwidth / TINY_BYTES_PER_STEP)
        assert row["of_roofline"] == pytest.approx(row["median"] / row["roofline_tokens_per_s"])
    diffs = [c["max_logit_diff"] for c in report["strategies"] if c["verdict"] == "yes"]
    assert len(diffs) == 3 and all(0 <= d <= 1e-4 for d in diffs)
    table = (out / "device-check.md").read_text()
    assert re.search(r"\| tiny \| yes, \S+ \| yes, \S+ \| yes, \S+ \| refused: llama has no expert", table), table
    assert "| eager | 1 | " in table and "| eager | 2 | " in table and "GB/s" in table
    assert re.search(r"\| compile \| 1 \| .* s \(compiling \S+ s\) \|", table), table
