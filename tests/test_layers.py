"""The layers: every import runs api → telephony → engine, never back, and no module imports
itself through others (a cycle); no front end imports another. Read from the source, lazy
imports inside functions and relative imports included."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("api", "telephony", "engine")  # each may import those after it, never those before


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def absolute(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The module a `from ... import` names, a relative one resolved against `name`."""
    if node.level == 0:
        return node.module or ""
    base = name.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports() -> dict[str, set[str]]:
    """Each module of the three packages → the modules of those packages it imports."""
    graph: dict[str, set[str]] = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            name = module_name(path)
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    module = absolute(node, name, path.name == "__init__.py")
                    found.add(module)
                    found.update(f"{module}.{alias.name}" for alias in node.names)
            graph[name] = {m for m in found if m.split(".")[0] in LAYERS}
    modules = set(graph)
    return {name: {m for m in deps if m in modules} - {name} for name, deps in graph.items()}


def test_imports_point_down() -> None:
    upward = [
        f"{name} imports {dep}"
        for name, deps in imports().items()
        for dep in deps
        if LAYERS.index(dep.split(".")[0]) < LAYERS.index(name.split(".")[0])
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    graph = imports()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


PACKAGED_FRONT_ENDS = ("telephony.carriers", "telephony.sip", "telephony.audiohook")
# Two modules, one route: `/freeswitch` takes mod_audio_fork and mod_audio_stream.
FREESWITCH = {"telephony.audio_fork": "freeswitch", "telephony.audio_stream": "freeswitch"}


def family(name: str) -> str:
    """A front end and its own modules (a package's, a codec beside its handler) are one."""
    if name in FREESWITCH:
        return FREESWITCH[name]
    return next((f for f in PACKAGED_FRONT_ENDS if name.startswith(f)), name)


def front_ends() -> set[str]:
    """The families of modules that name a `FRONT_END`, and of the front-end packages."""
    found = set(PACKAGED_FRONT_ENDS)
    for path in (ROOT / "telephony").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:
            targets = [node.target] if isinstance(node, ast.AnnAssign) else []
            targets += node.targets if isinstance(node, ast.Assign) else []
            if any(isinstance(t, ast.Name) and t.id == "FRONT_END" for t in targets):
                found.add(family(module_name(path)))
    return found


def test_front_ends_do_not_import_each_other() -> None:
    """What two front ends share lives below them (audio, session, ws_front, dtmf, ...)."""
    fronts = front_ends()
    assert {"telephony.twilio", "telephony.websocket", "telephony.carriers"} <= fronts
    crossing = [
        f"{name} imports {dep}"
        for name, deps in imports().items()
        for dep in deps
        if family(name) in fronts and family(dep) in fronts and family(dep) != family(name)
    ]
    assert crossing == []


def test_relative_imports_are_resolved() -> None:
    node = ast.parse("from ..audio import x").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert absolute(node, "telephony.carriers.events", False) == "telephony.audio"
    node = ast.parse("from . import events").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert absolute(node, "telephony.carriers", True) == "telephony.carriers"


def test_every_package_is_in_the_built_wheel() -> None:
    """setuptools installs only the packages pyproject.toml lists: a package missing there is
    missing from a wheel (`pip install .`), though every test run from the tree still finds it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    packages = {
        module_name(path) for layer in LAYERS for path in (ROOT / layer).rglob("__init__.py")
    }
    assert packages <= listed, sorted(packages - listed)
