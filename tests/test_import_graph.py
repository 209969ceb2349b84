"""The import graph of the non-test code: no cycles, and no import against the layers.

Layers (README "Layout", docs/ARCHITECTURE.md): ``avatar_server -> streaming -> engine``; a
package imports only packages below it. ``clients`` is a separate program that speaks the wire
protocol: it imports ``avatar_server.protocol`` (the wire contract), ``streaming.webrtc`` /
``avatar_server.webrtc`` (the shared WebRTC helpers) and nothing else of the server. ``ops``
measures the served code and may import any layer; no layer imports ``ops`` or ``clients``
(the CLI dispatches to ``clients.cli`` by a lazy import of its entry point, listed below).

Every import that runs counts, at module level or inside a function: a lazy import that closes a
cycle is still a cycle in the design. Imports under ``if TYPE_CHECKING:`` never run (they name a
type for annotations, e.g. the connection's reference to the server that owns it) and do not count. An import of ``a.b.c`` depends on the module ``a.b.c`` (or the
package ``a.b`` when ``c`` is a name in it). A package's ``__init__`` importing its own
submodules is not a cycle by itself; a submodule importing its package back while the package
imports it is.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("avatar_server", "streaming", "engine", "clients", "ops")
LAYER = {"engine": 0, "streaming": 1, "avatar_server": 2}
CLIENT_MAY_IMPORT = ("avatar_server.protocol", "avatar_server.webrtc", "streaming.webrtc")
# The one import from a layer into clients: the CLI's `client` subcommand, imported lazily.
ENTRY_POINT_DISPATCH = {("avatar_server.cli", "clients.cli")}


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    """The modules ``node`` imports: ``from a import b`` imports the module ``a.b`` when there is
    one, else (a name defined in ``a``) the module ``a``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        if path.name != "__init__.py":
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join([*parts, *([node.module] if node.module else [])])
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (directly), for every module of ``PACKAGES``."""
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        type_only = {
            id(child)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in ast.walk(node)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in type_only:
                continue
            for target in _targets(module, path, node, modules):
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module and target.split(".")[0] in PACKAGES:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    nodes = set(graph) | {t for targets in graph.values() for t in targets}
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports against the layering described in the module docstring."""
    problems = []
    for module, targets in sorted(graph.items()):
        top = module.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if other == top:
                continue
            if top in LAYER and other in LAYER and LAYER[other] > LAYER[top]:
                problems.append(f"{module} -> {target}: {top} is below {other}")
            elif top in LAYER and other in ("clients", "ops") and (module, target) not in ENTRY_POINT_DISPATCH:
                problems.append(f"{module} -> {target}: no layer imports {other}")
            elif top == "clients" and not target.startswith(CLIENT_MAY_IMPORT):
                problems.append(f"{module} -> {target}: clients import only {', '.join(CLIENT_MAY_IMPORT)}")
    return problems


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_import_against_the_layers() -> None:
    problems = violations(import_graph())
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_the_checks_see_a_cycle_and_an_upward_import() -> None:
    """The two checks fail on the shapes they exist for (the cycles of December 2026 were
    ``limits <-> server`` and ``pipeline <-> stack``; the upward import ``cli -> clients``)."""
    graph = {
        "avatar_server.limits": {"avatar_server.server"},
        "avatar_server.server": {"avatar_server.limits", "streaming.session"},
        "engine.pipeline": {"streaming.session"},
        "clients.client": {"avatar_server.settings", "avatar_server.protocol"},
        "avatar_server.app": {"clients.client"},
    }
    assert cycles(graph) == [["avatar_server.limits", "avatar_server.server"]]
    assert violations(graph) == [
        "avatar_server.app -> clients.client: no layer imports clients",
        "clients.client -> avatar_server.settings: clients import only "
        "avatar_server.protocol, avatar_server.webrtc, streaming.webrtc",
        "engine.pipeline -> streaming.session: engine is below streaming",
    ]
