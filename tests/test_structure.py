"""The package's structure, read from its source (ast), no engine started.

- calls go one way: no import cycle inside mpbook, counting imports inside functions too
  (they run as surely as module-level ones, only later);
- code that runs on the engines never imports the client side;
- private names of ipyparallel, argparse and torch are used only in ``mpbook/compat``, each
  adapter there says what it was checked against and can verify it.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mpbook"
# Modules of the notebook's side: an engine never runs them, and code that runs on the
# engines must not import them (it would pull the client's layers into every engine).
CLIENT = ("cluster", "session", "workbench", "magics", "dashboard", "planner", "bench")
ENGINE = ("engine",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Line numbers of the imports under ``if TYPE_CHECKING:`` (annotations; never run)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        lines.add(sub.lineno)
    return lines


def imports(name: str, *, runtime_only: bool) -> dict[str, int]:
    """The mpbook modules ``name`` imports, anywhere in its source -> the first line that does.

    ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module (and not
    ``pkg``'s ``__init__``, which Python runs for every module of the package anyway).
    """
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree) if runtime_only else set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if node.__class__ not in (ast.Import, ast.ImportFrom) or node.lineno in skip:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            subs = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in MODULES]
            targets = subs if len(subs) == len(node.names) else [source, *subs]
        for target in targets:
            # `import mpbook.engine.state` imports that module; `mpbook.x.fn` is x's
            while target and target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target in MODULES and target != name:
                found.setdefault(target, node.lineno)
    return found


@functools.cache
def graph(*, runtime_only: bool) -> dict[str, dict[str, int]]:
    return {name: imports(name, runtime_only=runtime_only) for name in MODULES}


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def one_cycle(edges: dict[str, dict[str, int]], members: list[str]) -> str:
    """The shortest path around one component, a -> b (file:line) -> ... -> a."""
    inside, start = set(members), members[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        here = queue.pop(0)
        for nxt in sorted(edges[here]):
            if nxt == start:
                path = paths[here] + [start]
                return "; ".join(
                    f"{a} -> {b} ({MODULES[a].relative_to(PACKAGE.parent)}:{edges[a][b]})" for a, b in zip(path, path[1:])
                )
            if nxt in inside and nxt not in paths:
                paths[nxt] = paths[here] + [nxt]
                queue.append(nxt)
    return " <-> ".join(members)


def test_the_walk_sees_the_package():
    edges = graph(runtime_only=True)
    assert {"mpbook.workbench", "mpbook.session", "mpbook.cluster.calls", "mpbook.engine.state"} <= set(MODULES)
    # a module-level, a relative and a function-level import are all seen
    assert "mpbook.session" in edges["mpbook.workbench"]
    assert "mpbook.engine.publish" in edges["mpbook.engine.state"]  # inside setup()
    assert "mpbook.dashboard" in edges["mpbook.workbench"]  # inside _follower()


def test_cycles_are_found_when_there_are_some():
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycle_inside_the_package():
    edges = graph(runtime_only=True)
    found = [one_cycle(edges, members) for members in cycles(edges)]
    assert not found, "import cycles (calls must go one way; pass a callback down instead):\n" + "\n".join(found)


def _is_under(name: str, tops: tuple[str, ...]) -> bool:
    return any(name == f"mpbook.{top}" or name.startswith(f"mpbook.{top}.") for top in tops)


def test_engine_side_never_imports_the_client_side():
    edges = graph(runtime_only=False)  # a type-only import is still knowledge of the client
    wrong = [
        f"{name} imports {target} ({MODULES[name].relative_to(PACKAGE.parent)}:{line})"
        for name, targets in edges.items()
        if _is_under(name, ENGINE)
        for target, line in targets.items()
        if _is_under(target, CLIENT)
    ]
    assert not wrong, "engine-side code imports the client side:\n" + "\n".join(wrong)


# Layers of the client, top to bottom (CONTRACTS: magics -> workbench -> session -> cluster ->
# engines), with the tools that drive the whole (bench, the one-device reference) on top. A
# module may import its own layer and those below, never one above; what is not listed
# (engine, parallel, models, protocol, layout, units, options, errors, devices, interrupts, compat,
# plots, results, soak) is the bottom layer, shared by both sides.
LAYERS = {
    "mpbook": 5, "mpbook.__main__": 5, "mpbook.bench": 5, "mpbook.bench_transports": 5, "mpbook.bench_peers": 5,
    "mpbook.reference": 5,
    "mpbook.magics": 4,
    "mpbook.workbench": 3,
    "mpbook.session": 2, "mpbook.dashboard": 2,
    "mpbook.cluster": 1, "mpbook.planner": 1,
}


def layer(name: str) -> int:
    if name in LAYERS:
        return LAYERS[name]
    parent = name.rpartition(".")[0]
    return layer(parent) if parent != "mpbook" else 0  # a module of a listed package


def test_no_module_imports_a_layer_above_its_own():
    edges = graph(runtime_only=False)
    wrong = [
        f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)}) "
        f"({MODULES[name].relative_to(PACKAGE.parent)}:{line})"
        for name, targets in edges.items()
        for target, line in targets.items()
        if layer(target) > layer(name)
    ]
    assert not wrong, "calls must go one way, top to bottom; pass a callback down instead:\n" + "\n".join(wrong)


# ----------------------------------------------------------------------------- private APIs
LIBRARIES = ("ipyparallel", "argparse", "torch")
# Private names of those libraries that mpbook has used: found by name anywhere outside
# mpbook/compat, whatever object they are reached through.
KNOWN_PRIVATE = (
    "_metadata", "_children", "_actions", "_SubParsersAction", "_choices_actions", "_python_dispatch",
    "_pytree", "_signal_stop", "_abort_process_group", "_get_default_group", "_mesh_resources",
)


def _library_aliases(tree: ast.AST) -> dict[str, str]:
    """Local names bound to those libraries or their modules: ``dist`` -> torch.distributed."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES:
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in LIBRARIES:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def private_uses(source: str, where: str) -> list[str]:
    """Private names of ipyparallel, argparse or torch that ``source`` uses, with their lines."""
    tree = ast.parse(source, where)
    aliases = _library_aliases(tree)
    found = []
    for node in ast.walk(tree):
        # `from torch.utils._pytree import x`, `import torch.distributed.distributed_c10d._x`
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            names = []
        for name in names:
            parts = name.split(".")
            if parts[0] in LIBRARIES and any(p.startswith("_") and not p.startswith("__") for p in parts[1:]):
                found.append(f"{where}:{node.lineno}: imports {name}")
                break
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            through_library = isinstance(root, ast.Name) and root.id in aliases
            if through_library or node.attr in KNOWN_PRIVATE:
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
        # getattr(x, "_children"), hasattr(...)
        if (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in KNOWN_PRIVATE
        ):
            found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_private_api_check_finds_what_it_looks_for():
    sample = (
        "import argparse\nimport torch.distributed as dist\nfrom torch.utils._pytree import tree_leaves\n"
        "def f(self, parser, result):\n"
        "    a = parser._actions\n    b = dist.distributed_c10d._abort_process_group\n"
        "    c = getattr(result, '_children', None)\n    d = argparse._SubParsersAction\n"
        "    e = self._own_thing\n"
    )
    found = private_uses(sample, "sample.py")
    assert [use.split(":")[1] for use in found] == ["3", "5", "6", "7", "8"], found


def test_private_apis_of_ipyparallel_argparse_and_torch_are_used_only_in_compat():
    found = [
        use
        for name, path in MODULES.items()
        if not (name == "mpbook.compat" or name.startswith("mpbook.compat."))
        for use in private_uses(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    ]
    assert not found, "private APIs outside mpbook/compat (put them behind an adapter there):\n" + "\n".join(found)


# Known uses in tests that their owners have been asked to move behind mpbook.compat; a
# new one fails, and so does an entry here that is no longer needed (remove it then).
KNOWN_IN_TESTS = {
}


def test_tests_use_private_apis_only_through_compat():
    here = Path(__file__).resolve()
    uses = [
        use
        for path in sorted(here.parent.glob("*.py"))
        if path != here
        for use in private_uses(path.read_text(), f"tests/{path.name}")
    ]
    known = {use for use in uses if KNOWN_IN_TESTS.get(use.split(":")[0], "\0") in use}
    stale = [f for f, what in KNOWN_IN_TESTS.items() if not any(use.startswith(f) and what in use for use in known)]
    assert not stale, f"KNOWN_IN_TESTS lists uses that are gone; remove them: {stale}"
    found = [use for use in uses if use not in known]
    assert not found, "tests reach into private APIs of those libraries; use mpbook.compat:\n" + "\n".join(found)


@pytest.mark.parametrize("library", LIBRARIES)
def test_every_adapter_names_the_versions_it_was_checked_against(library):
    import importlib

    adapter = importlib.import_module(f"mpbook.compat.{library}")
    assert re.fullmatch(r"\d+\.\d+(-\d+\.\d+)?", adapter.CHECKED), adapter.CHECKED
    assert callable(adapter.verify)


def test_loading_the_extension_does_not_import_torch_or_transformers():
    """``%load_ext mpbook`` and ``import mpbook`` stay quick (torch alone takes seconds to
    import): the client imports torch and transformers when it first needs them."""
    import subprocess
    import sys

    code = (
        "import sys, mpbook, mpbook.magics, mpbook.workbench\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", (
        f"importing mpbook imports {done.stdout.strip()}; import them inside the functions that need them"
    )
