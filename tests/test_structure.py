"""The package's structure, read from its source (ast), no engine started.

- calls go one way: no import cycle inside mpbook, counting imports inside functions too
  (they run as surely as module-level ones, only later) and those for type annotations only
  (a module that names another's types knows it);
- code that runs on the engines never imports the client side;
- private names of other libraries (imports of their private or internal modules, attributes
  that are underscored and not mpbook's own, overrides of their underscored methods) are used
  only in ``mpbook/compat``; each adapter there says what it was checked against and can
  verify it.
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


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules_of(package: Path) -> dict[str, Path]:
    """Every module of the package at ``package`` (a folder named mpbook) -> its file."""
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


MODULES = modules_of(PACKAGE)


def imports(name: str, modules: dict[str, Path] = MODULES) -> dict[str, int]:
    """The mpbook modules ``name`` imports, anywhere in its source -> the first line that does.

    Imports inside functions count (they run as surely as module-level ones, only later), and
    so do those under ``if TYPE_CHECKING:``: never run, but a module that names another's types
    knows it, and two modules that know each other are one. ``from pkg import sub`` counts as
    importing ``pkg.sub`` when that is a module (and not ``pkg``'s ``__init__``, which Python
    runs for every module of the package anyway).
    """
    path = modules[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if node.__class__ not in (ast.Import, ast.ImportFrom):
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
            subs = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules]
            targets = subs if len(subs) == len(node.names) else [source, *subs]
        for target in targets:
            # `import mpbook.engine.state` imports that module; `mpbook.x.fn` is x's
            while target and target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                found.setdefault(target, node.lineno)
    return found


def graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    return {name: imports(name, modules) for name in modules}


@functools.cache
def package_graph() -> dict[str, dict[str, int]]:
    return graph(MODULES)


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


def one_cycle(edges: dict[str, dict[str, int]], members: list[str], modules: dict[str, Path] = MODULES) -> str:
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
                    f"{a} -> {b} ({modules[a].relative_to(modules['mpbook'].parent.parent)}:{edges[a][b]})"
                    for a, b in zip(path, path[1:])
                )
            if nxt in inside and nxt not in paths:
                paths[nxt] = paths[here] + [nxt]
                queue.append(nxt)
    return " <-> ".join(members)


def test_the_walk_sees_the_package():
    edges = package_graph()
    assert {"mpbook.workbench", "mpbook.session", "mpbook.cluster.calls", "mpbook.engine.state"} <= set(MODULES)
    # a module-level, a relative and a function-level import are all seen
    assert "mpbook.session" in edges["mpbook.workbench"]
    assert "mpbook.engine.publish" in edges["mpbook.engine.group"]  # inside setup()
    assert "mpbook.dashboard" in edges["mpbook.workbench"]  # inside _follower()


def test_cycles_are_found_when_there_are_some():
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycle_inside_the_package():
    edges = package_graph()
    found = [one_cycle(edges, members) for members in cycles(edges)]
    assert not found, "import cycles (calls must go one way; pass a callback down instead):\n" + "\n".join(found)


def test_a_circle_made_by_a_type_checking_import_is_found(tmp_path):
    """A copy of the package where layout.py names the planner's MemoryPlan for its annotations
    only (the planner imports layout): the two know each other, so they are one circle."""
    import shutil

    copy = tmp_path / "mpbook"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    layout = copy / "layout.py"
    layout.write_text(layout.read_text() + (
        "\n\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .planner.memory_plan import MemoryPlan\n"
    ))
    modules = modules_of(copy)
    edges = graph(modules)
    assert edges["mpbook.layout"]["mpbook.planner.memory_plan"] == len(layout.read_text().splitlines())
    circles = [members for members in cycles(edges) if "mpbook.layout" in members]
    assert len(circles) == 1 and "mpbook.planner.memory_plan" in circles[0], circles
    assert "mpbook.layout -> mpbook.planner.memory_plan (mpbook/layout.py:" in one_cycle(edges, circles[0], modules)


def _is_under(name: str, tops: tuple[str, ...]) -> bool:
    return any(name == f"mpbook.{top}" or name.startswith(f"mpbook.{top}.") for top in tops)


def test_engine_side_never_imports_the_client_side():
    edges = package_graph()  # a type-only import is still knowledge of the client
    wrong = [
        f"{name} imports {target} ({MODULES[name].relative_to(PACKAGE.parent)}:{line})"
        for name, targets in edges.items()
        if _is_under(name, ENGINE)
        for target, line in targets.items()
        if _is_under(target, CLIENT)
    ]
    assert not wrong, "engine-side code imports the client side:\n" + "\n".join(wrong)


# Layers of the client, top to bottom (README's "How the code is laid out": magics -> workbench
# -> session -> cluster -> engines), with the tools that drive the whole (bench, the one-device
# reference, the conformance sweep) on top. A
# module may import its own layer and those below, never one above; what is not listed
# (engine, parallel, models, protocol, layout, units, options, errors, devices, interrupts, compat,
# plots, results, soak) is the bottom layer, shared by both sides.
LAYERS = {
    "mpbook": 5, "mpbook.__main__": 5, "mpbook.bench": 5, "mpbook.bench_transports": 5, "mpbook.bench_peers": 5,
    "mpbook.reference": 5, "mpbook.conformance": 5, "mpbook.bench_predict": 5,
    "mpbook.magics": 4, "mpbook.explorer": 4,
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
    edges = package_graph()
    wrong = [
        f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)}) "
        f"({MODULES[name].relative_to(PACKAGE.parent)}:{line})"
        for name, targets in edges.items()
        for target, line in targets.items()
        if layer(target) > layer(name)
    ]
    assert not wrong, "calls must go one way, top to bottom; pass a callback down instead:\n" + "\n".join(wrong)


# ----------------------------------------------------------------------------- private APIs
LIBRARIES = ("ipyparallel", "argparse", "torch", "transformers", "ipywidgets")
# Modules of those libraries that are not underscored but not public either.
INTERNAL_MODULES = ("transformers.core_model_loading", "transformers.conversion_mapping")
# Private names of those libraries that mpbook has used: found by name anywhere outside
# mpbook/compat, whatever object they are reached through, even where mpbook has a name alike.
KNOWN_PRIVATE = (
    "_metadata", "_children", "_actions", "_SubParsersAction", "_choices_actions", "_python_dispatch",
    "_pytree", "_signal_stop", "_abort_process_group", "_get_default_group", "_mesh_resources",
    "_attn_implementation", "_experts_implementation", "_pp_plan", "_init_weights", "_is_expert_parallel",
    "_parameters", "_buffers",
)
# Underscored names that are documented API: a named tuple's methods, os._exit, IPython's
# display protocol.
DOCUMENTED = ("_replace", "_asdict", "_fields", "_make", "_exit", "_repr_html_", "_repr_png_", "_repr_svg_",
              "_repr_mimebundle_", "_repr_pretty_", "_ipython_display_")


def _foreign_bases(tree: ast.AST) -> dict[str, str]:
    """Local names bound by absolute imports from outside mpbook (classes a class may extend)
    -> what they import: ``MemTracker`` -> torch.distributed._tools.mem_tracker.MemTracker."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "mpbook":
                    names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] != "mpbook":
            names |= {alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _resolve(dotted: str):
    """The object a dotted name of another library names, or None where it cannot be imported."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for part in parts[cut:]:
                found = getattr(found, part)
        except AttributeError:
            return None
        return found
    return None


def _overridden(node: ast.ClassDef, foreign: dict[str, str]) -> set[str]:
    """The underscored attributes of the libraries' classes that ``node`` extends, which it defines again."""
    bases = []
    for base in node.bases:
        root, chain = base, []
        while isinstance(root, ast.Attribute):
            chain.insert(0, root.attr)
            root = root.value
        if isinstance(root, ast.Name) and root.id in foreign:
            bases.append(_resolve(".".join([foreign[root.id], *chain])))
    defined = {item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return {name for name in defined if _private(name) and any(hasattr(base, name) for base in bases if base is not None)}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def own_names(sources: list[str]) -> set[str]:
    """The underscored names these sources define themselves: functions, classes, methods (not
    overrides in a class extending a library's), variables, arguments, and attributes set on
    ``self`` or ``cls``. A private attribute that is none of these belongs to another library."""
    names: set[str] = set()
    for source in sources:
        tree = ast.parse(source)
        foreign = _foreign_bases(tree)
        overrides = {
            id(item)
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef)
            for item in node.body
            if getattr(item, "name", None) in _overridden(node, foreign)
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and id(node) not in overrides:
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif (
                isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            ):
                names.add(node.attr)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[-1])
    return {name for name in names if _private(name)}


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


def private_uses(source: str, where: str, own: set[str] = frozenset()) -> list[str]:
    """Private names of other libraries that ``source`` uses, with their lines: imports of a
    private or internal module of ipyparallel, argparse, torch or transformers; any attribute
    (``x._name``, ``getattr(x, "_name")``) that is reached through one of them, is a known
    private name, or is underscored and not one of ``own`` (the names mpbook defines); and a
    class extending a library's that overrides one of its underscored methods."""
    tree = ast.parse(source, where)
    aliases = _library_aliases(tree)
    foreign = _foreign_bases(tree)
    found = []

    def foreign_name(name: str) -> bool:
        return _private(name) and (name in KNOWN_PRIVATE or (name not in own and name not in DOCUMENTED))

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
            internal = any(name == m or name.startswith(m + ".") for m in INTERNAL_MODULES)
            if parts[0] in LIBRARIES and (internal or any(_private(p) for p in parts[1:])):
                found.append(f"{where}:{node.lineno}: imports {name}")
                break
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            through_library = isinstance(root, ast.Name) and root.id in aliases
            if through_library or foreign_name(node.attr):
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
        # getattr(x, "_children"), hasattr(...), setattr(...)
        if (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
            and foreign_name(node.args[1].value)
        ):
            found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if getattr(item, "name", None) in _overridden(node, foreign) and foreign_name(item.name):
                    found.append(f"{where}:{item.lineno}: {node.name} overrides {item.name}")
    return found


def _outside_compat(modules: dict[str, Path]) -> dict[str, Path]:
    return {name: path for name, path in modules.items() if not (name == "mpbook.compat" or name.startswith("mpbook.compat."))}


@functools.cache
def package_own_names() -> frozenset[str]:
    return frozenset(own_names([path.read_text() for path in _outside_compat(MODULES).values()]))


def package_private_uses(modules: dict[str, Path], own: set[str]) -> list[str]:
    root = modules["mpbook"].parent.parent
    return [
        use
        for path in _outside_compat(modules).values()
        for use in private_uses(path.read_text(), str(path.relative_to(root)), own)
    ]


def test_the_private_api_check_finds_what_it_looks_for():
    sample = (
        "import argparse\nimport torch.distributed as dist\nfrom torch.utils._pytree import tree_leaves\n"
        "def f(self, parser, result):\n"
        "    a = parser._actions\n    b = dist.distributed_c10d._abort_process_group\n"
        "    c = getattr(result, '_children', None)\n    d = argparse._SubParsersAction\n"
        "    e = self._own_thing\n"
    )
    found = private_uses(sample, "sample.py", own_names([sample]) | {"_own_thing"})
    assert [use.split(":")[1] for use in found] == ["3", "5", "6", "7", "8"], found


def test_the_check_sees_a_private_attribute_of_any_object():
    """Attributes reached through a plain variable (a config, a module, a model): not a known
    name, not imported from anywhere the check looks at, only underscored and not mpbook's own."""
    sample = (
        "from transformers.core_model_loading import WeightConverter\n"
        "from torch.distributed._tools.mem_tracker import MemTracker\n"
        "class _Mine:\n    def _helper(self):\n        self._count = 1\n"
        "class Tracker(MemTracker):\n    def _pre_fw_hook(self, module, inputs):\n        pass\n"
        "def load(config, owner, model, row):\n"
        "    a = config._new_private_flag\n"
        "    owner._buffers['x'] = None\n"
        "    b = getattr(model, '_some_class_plan', None)\n"
        "    c = _Mine()._helper(), owner._count\n"
        "    d = row._replace(dim=0)\n"
    )
    found = sorted(private_uses(sample, "sample.py", own_names([sample])), key=lambda use: int(use.split(":")[1]))
    assert found == [
        "sample.py:1: imports transformers.core_model_loading",
        "sample.py:2: imports torch.distributed._tools.mem_tracker",
        "sample.py:7: Tracker overrides _pre_fw_hook",
        "sample.py:10: config._new_private_flag",
        "sample.py:11: owner._buffers",
        "sample.py:12: getattr(model, '_some_class_plan', None)",
    ], found


def test_a_private_attribute_planted_in_the_package_is_found(tmp_path):
    """A copy of the package with a module that reads a config's private attribute, reached
    through nothing the check knows by name: the check of the whole package names it."""
    import shutil

    copy = tmp_path / "mpbook"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert package_private_uses(modules_of(copy), package_own_names()) == []
    (copy / "models" / "planted.py").write_text(
        '"""Planted by the test."""\n\n\ndef window(config):\n    return config._sliding_window_internal\n'
    )
    modules = modules_of(copy)
    own = own_names([path.read_text() for path in _outside_compat(modules).values()])
    assert package_private_uses(modules, own) == ["mpbook/models/planted.py:5: config._sliding_window_internal"]


def test_private_apis_of_other_libraries_are_used_only_in_compat():
    found = package_private_uses(MODULES, package_own_names())
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
        for use in private_uses(path.read_text(), f"tests/{path.name}", package_own_names() | own_names([path.read_text()]))
    ]
    known = {use for use in uses if KNOWN_IN_TESTS.get(use.split(":")[0], "\0") in use}
    stale = [f for f, what in KNOWN_IN_TESTS.items() if not any(use.startswith(f) and what in use for use in known)]
    assert not stale, f"KNOWN_IN_TESTS lists uses that are gone; remove them: {stale}"
    found = [use for use in uses if use not in known]
    assert not found, "tests reach into private APIs of other libraries; use mpbook.compat:\n" + "\n".join(found)


@pytest.mark.parametrize("library", LIBRARIES)
def test_every_adapter_names_the_versions_it_was_checked_against(library):
    import importlib

    adapter = importlib.import_module(f"mpbook.compat.{library}")
    assert re.fullmatch(r"\d+\.\d+(-\d+\.\d+)?", adapter.CHECKED), adapter.CHECKED
    assert callable(adapter.verify)


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def third_party_imports(modules: dict[str, Path]) -> dict[str, str]:
    """Top-level modules outside the standard library and mpbook that ``modules`` import
    (anywhere, inside functions too) -> the first place that does."""
    import sys

    found: dict[str, str] = {}
    root = modules["mpbook"].parent.parent
    for path in modules.values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top and top != "mpbook" and top not in sys.stdlib_module_names:
                    found.setdefault(top, f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_every_library_mpbook_imports_is_a_declared_dependency():
    """A library used only because another one brings it breaks when that one stops."""
    import importlib.metadata
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    imported = third_party_imports(MODULES)
    assert {"torch", "transformers", "tokenizers", "traitlets"} <= set(imported)  # the walk sees them
    undeclared = [
        f"{where}: imports {top} ({' or '.join(distributions.get(top, ['no installed distribution']))})"
        for top, where in sorted(imported.items())
        if not {_requirement_name(d) for d in distributions.get(top, [])} & declared
    ]
    assert not undeclared, "declare these in pyproject.toml's dependencies:\n" + "\n".join(undeclared)


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
