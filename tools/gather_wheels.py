"""Gather here, from PyPI, the wheels mpbook and its test extra need on the device machine.

The device machine (one H200; see tools/device-check.sh) has Python 3.12 with torch,
transformers and a large scientific stack, none of the Jupyter stack, and no network. This
downloads, for its Python and platform, every wheel mpbook's requirements and test extra pull
in that it does not have (tools/device-target.txt), into an ignored folder that the device
call carries (``.device-wheels/`` by default), then checks the folder against the target:
every requirement of every carried wheel is either carried or installed there.

    python tools/gather_wheels.py                       # for the device: Python 3.12
    python tools/gather_wheels.py --python-version 3.11 --dest /tmp/w   # for this machine (the test)

Two requirements are left out on purpose (``LEFT_OUT``) and one package the target has is
carried anyway (``CARRIED_OVER``); each says why.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
TARGET_LIST = Path(__file__).resolve().parent / "device-target.txt"
DEFAULT_DEST = ROOT / ".device-wheels"
DEVICE_CALL = 'run(command="bash tools/device-check.sh", carry=[".device-wheels"], timeout_s=540)'
# The device call carries the working tree (about 1 MiB) and these wheels: 64 MiB in all.
DEFAULT_LIMIT_MIB = 56
# pip matches each manylinux tag exactly; these cover the wheels mpbook's stack publishes.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64")

LEFT_OUT = {
    "jupyterlab": "the notebook front end: no mpbook module imports it, and nothing opens a notebook in a "
                  "browser on the device machine (with its server stack it would weigh about 30 MiB)",
    "playwright": "drives Chromium in the browser tests, which the device machine does not have (about 40 MiB)",
}
# transformers 5.17, the version the device machine was seen with, runs none of mpbook's
# decode loop: its model forwards take no `cache` argument, and mpbook refuses every Llama
# ("its forward takes no cache"). The version installed beside this checkout (the one the
# suite runs against) is carried instead; its own requirements are on the target.
CARRIED_OVER = ("transformers",)


@dataclass(frozen=True)
class Target:
    """The device machine's Python and what is installed there: name -> version (None: not known)."""

    python_version: str = "3.12"
    installed: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def read(cls, python_version: str = "3.12", path: Path = TARGET_LIST) -> Target:
        installed = {}
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                installed[canonicalize_name(name)] = version or None
        return cls(python_version, installed)

    @property
    def markers(self) -> dict[str, str]:
        """The environment a requirement's markers are evaluated in: Linux x86-64, CPython."""
        return {"python_version": self.python_version, "python_full_version": self.python_version + ".0",
                "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython"}

    def applies(self, requirement: Requirement, extra: str = "") -> bool:
        return requirement.marker is None or requirement.marker.evaluate({**self.markers, "extra": extra})


def project_requirements(target: Target, pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """mpbook's dependencies and its ``test`` extra, as they apply on ``target``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    listed = project["dependencies"] + project.get("optional-dependencies", {}).get("test", [])
    return [r for r in map(Requirement, listed) if target.applies(r)]


def to_download(requirements: list[Requirement], target: Target) -> tuple[list[str], list[str]]:
    """(requirements to download with their dependencies, pinned carry-overs to download alone)."""
    resolved = [str(r) for r in requirements
                if canonicalize_name(r.name) not in target.installed and canonicalize_name(r.name) not in LEFT_OUT]
    pinned = [f"{name}=={metadata.version(name)}" for name in CARRIED_OVER]
    return resolved, pinned


def pip_download(requirements: list[str], folder: Path, target: Target, *, deps: bool = True) -> None:
    """``pip download`` of binary wheels for the target's Python and platform (from PyPI, or
    whatever index pip is configured with)."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--python-version", target.python_version, "--implementation", "cp",
               *platforms, "--dest", str(folder), *([] if deps else ["--no-deps"]), *requirements]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"pip download failed for {' '.join(requirements)}:\n{done.stderr[-3000:]}")


def wheel_name(path: Path) -> str:
    return canonicalize_name(parse_wheel_filename(path.name)[0])


def wheel_requirements(path: Path, target: Target) -> list[Requirement]:
    """The requirements a wheel declares (Requires-Dist), without extras, as they apply on ``target``."""
    with zipfile.ZipFile(path) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(wheel.read(name).decode())
    return [r for r in map(Requirement, meta.get_all("Requires-Dist") or []) if target.applies(r)]


def carried(folder: Path) -> dict[str, Path]:
    """Name -> wheel of each wheel in ``folder``."""
    return {wheel_name(p): p for p in sorted(folder.glob("*.whl"))}


def check(folder: Path, target: Target) -> tuple[list[str], list[str]]:
    """(problems, notes) of the wheels in ``folder`` on ``target``. A problem: a requirement
    that neither a carried wheel nor the target meets, or two versions of one package. A note: a
    requirement on a package the target has in a version the list does not give (pip check
    there says whether it holds)."""
    problems, notes = [], []
    wheels = sorted(folder.glob("*.whl"))
    names = [wheel_name(p) for p in wheels]
    problems += [f"two wheels of {n}: keep one" for n in sorted({n for n in names if names.count(n) > 1})]
    have = {wheel_name(p): parse_wheel_filename(p.name)[1] for p in wheels}
    for path in wheels:
        for req in wheel_requirements(path, target):
            name = canonicalize_name(req.name)
            version = have.get(name) or target.installed.get(name)
            if name not in have and name not in target.installed:
                problems.append(f"{path.name} needs {req}: neither carried nor on the device machine")
            elif version is None:
                if req.specifier:
                    notes.append(f"{path.name} needs {req}; the device machine's version is not listed")
            elif not req.specifier.contains(str(version), prereleases=True):
                problems.append(f"{path.name} needs {req}; the device machine has {name} {version}: carry a wheel")
    return problems, notes


def gather(dest: Path, target: Target) -> list[Path]:
    """Download into ``dest`` (its old wheels removed first) what mpbook needs on ``target``
    beyond what it has; returns the wheels kept."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    resolved, pinned = to_download(project_requirements(target), target)
    with tempfile.TemporaryDirectory(prefix="mpbook-wheels-") as stage:
        stage = Path(stage)
        pip_download(resolved, stage, target)
        for wheel in stage.glob("*.whl"):  # the target's own copies of shared dependencies stay
            if wheel_name(wheel) in target.installed and wheel_name(wheel) not in CARRIED_OVER:
                wheel.unlink()
        for wheel in stage.glob("*.whl"):
            if wheel_name(wheel) in CARRIED_OVER:
                wheel.unlink()  # (a dependency's pick; the pinned version below is the one carried)
        pip_download(pinned, stage, target, deps=False)
        # What a carried-over wheel needs that the target lacks, or has in another version
        # (transformers 5.25 needs huggingface-hub 2 and kernels): downloaded with their own
        # dependencies, the target's copies of those again left to the target.
        unmet = [str(req) for name in CARRIED_OVER for wheel in stage.glob("*.whl") if wheel_name(wheel) == name
                 for req in wheel_requirements(wheel, target) if not _met(req, target)]
        if unmet:
            pip_download(unmet, stage, target)
            wanted = {canonicalize_name(Requirement(r).name) for r in unmet}
            for wheel in stage.glob("*.whl"):
                if wheel_name(wheel) in CARRIED_OVER:
                    if str(parse_wheel_filename(wheel.name)[1]) != metadata.version(wheel_name(wheel)):
                        wheel.unlink()  # (a dependency's pick again; the pinned one stays)
                elif wheel_name(wheel) in target.installed and wheel_name(wheel) not in wanted:
                    wheel.unlink()  # the target's version serves
        for wheel in stage.glob("*.whl"):
            shutil.move(wheel, dest / wheel.name)
    return sorted(dest.glob("*.whl"))


def _met(req: Requirement, target: Target) -> bool:
    """Whether the target has ``req``'s package in a version it allows (or one not listed)."""
    name = canonicalize_name(req.name)
    if name not in target.installed:
        return False
    version = target.installed[name]
    return version is None or req.specifier.contains(version, prereleases=True)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/gather_wheels.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12", help="the target's Python (default 3.12, the device's)")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"where (default {DEFAULT_DEST.name}/)")
    parser.add_argument("--limit-mib", type=float, default=DEFAULT_LIMIT_MIB,
                        help=f"fail if the wheels weigh more (default {DEFAULT_LIMIT_MIB}: the call carries 64 MiB "
                             "with the working tree)")
    args = parser.parse_args(argv)
    target = Target.read(args.python_version)
    wheels = gather(args.dest, target)
    size = sum(p.stat().st_size for p in wheels)
    for path in wheels:
        print(f"  {path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
    print(f"{len(wheels)} wheels, {mib(size)} in {args.dest}")
    for name, why in LEFT_OUT.items():
        print(f"left out {name}: {why}")
    problems, notes = check(args.dest, target)
    for note in notes:
        print(f"note: {note}")
    if size > args.limit_mib * 2**20:
        problems.append(f"the wheels weigh {mib(size)}, over --limit-mib {args.limit_mib:g}")
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    if not problems and args.dest.resolve() == DEFAULT_DEST:
        print(f"the device tool's call: {DEVICE_CALL}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
