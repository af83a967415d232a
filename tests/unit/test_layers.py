"""The packages sit in layers and import only downwards (see runtime/__init__.py).

Every import counts, at the top of a module, inside a function or under TYPE_CHECKING:
a lazy import still ties two parts together. The one exception is the CLI's developer
parts, which load runtime.dev when they run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]

# Lower first. A part may import itself and anything before it, never what comes after.
LAYERS: list[set[str]] = [
    {"agent"},
    {"runtime"},  # the foundation: runtime/*.py
    {"runtime.backends", "runtime.livekit", "runtime.clients", "runtime.sessions"},
    {"actors"},
    {"runtime.http"},
    {"runtime.server"},
]
DEV = "runtime.dev"  # above production, beside it: it may use any layer below runtime.server
DEV_ALLOWED_IN = {"runtime.server.cli"}  # the developer commands, loaded lazily


def part_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "runtime" and len(parts) > 1 and (PROJECT / "runtime" / parts[1]).is_dir():
        return ".".join(parts[:2])  # a subpackage of runtime
    return parts[0]


def module_name(path: Path) -> str:
    rel = path.relative_to(PROJECT).with_suffix("")
    names = list(rel.parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in {"runtime", "actors", "agent"}}


def project_modules() -> dict[str, set[str]]:
    return {
        module_name(path): imports(path)
        for top in ("runtime", "actors", "agent")
        for path in sorted((PROJECT / top).rglob("*.py"))
    }


def rank(part: str) -> int:
    if part == DEV:
        return len(LAYERS) - 1  # beside the composition root: it may use what lies below it
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def allowed(module: str, name: str) -> bool:
    mine, theirs = part_of(module), part_of(name)
    if theirs == mine:
        return True
    if theirs == DEV:
        return module in DEV_ALLOWED_IN
    return rank(theirs) < rank(mine)


def test_every_part_imports_only_its_own_layer_and_those_below() -> None:
    upward = [
        f"{module} ({part_of(module)}) imports {name} ({part_of(name)})"
        for module, names in project_modules().items()
        for name in sorted(names)
        if not allowed(module, name)
    ]
    assert upward == []


def test_the_parts_form_no_cycle() -> None:
    edges: dict[str, set[str]] = {}
    for module, names in project_modules().items():
        mine = part_of(module)
        edges.setdefault(mine, set()).update(part_of(n) for n in names if part_of(n) != mine)
    seen: set[str] = set()
    path: list[str] = []

    def visit(part: str) -> None:
        assert part not in path, f"cycle: {' -> '.join([*path[path.index(part):], part])}"
        if part in seen:
            return
        path.append(part)
        for other in sorted(edges.get(part, ())):
            visit(other)
        path.pop()
        seen.add(part)

    for part in sorted(edges):
        visit(part)


def test_the_check_sees_an_upward_import() -> None:
    """The checker itself: an import of the HTTP layer from an actor is found."""
    probe = PROJECT / "actors" / "_layers_probe.py"
    probe.write_text("from runtime.http.gateway import create_app\n", encoding="utf-8")
    try:
        assert "runtime.http.gateway" in project_modules()["actors._layers_probe"]
        assert not allowed("actors._layers_probe", "runtime.http.gateway")
        assert not allowed("runtime.http.gateway", "runtime.dev.chat")  # production, dev tools
        assert not allowed("runtime.livekit.client", "runtime.backends.base")  # peers
        assert allowed("runtime.http.gateway", "actors.messages")
    finally:
        probe.unlink()
