"""`make lint`'s check of the house rule: dependencies among the service's modules point one
way, down, and there is no import cycle, lazy imports inside functions included.

Each module of `server/` belongs to one layer; a module may import modules of its own layer
or of a layer below, never above. Imports under `if TYPE_CHECKING:` are for the type checker
only and do not count. Run: `python -m tests.support.layers` (exit 1 and one line per
offending import or cycle).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "server"

# Top to bottom. A name ending in "." is a package prefix (the package and everything in it).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "runtime",
        (
            "server.__main__",
            "server.cli",
            "server.config",
            "server.app",
            "server.workers",
            "server.cleanup",
            "server.leader",
            "server.webhooks",
            "server.retention",
            "server.migrate",
            "server.runner",
            "server.checker",
            "server.importer.",
        ),
    ),
    (
        "doors",
        (
            "server.servicer",
            "server.interceptor",
            "server.admission",
            "server.status",
            "server.watch_servicer",
            "server.v4.",
        ),
    ),
    (
        "core",
        (
            "server.core",
            "server.rules",
            "server.cursor",
            "server.watch_hub",
            "server.watch_token",
            "server.watch_wire",
            "server.webhook_request",
        ),
    ),
    (
        "store",
        (
            "server.store",
            "server.outbox",
            "server.migrations",
            "server.graph_invariants",
            "server.webhook_queue",
        ),
    ),
    ("database", ("server.database", "server.embedded_conf")),
    # Vocabulary and plumbing every layer may use; they import nothing of the layers above.
    (
        "shared",
        (
            "server",
            "server.errors",
            "server.deadline",
            "server.origin",
            "server.logs",
            "server.metrics",
            "server.webhook_metrics",
            "server.tls",
            "server.webhook_http",
        ),
    ),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    for rank, (_, members) in enumerate(LAYERS):
        for member in members:
            if module == member or (member.endswith(".") and (module + ".").startswith(member)):
                return rank
    return None


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in `tree`, outside TYPE_CHECKING blocks."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from server import logs` imports the module server.logs
                yield f"{base}.{alias.name}", node.lineno
            yield base, node.lineno
        stack.extend(ast.iter_child_nodes(node))


def graph(package_dir: Path) -> dict[str, dict[str, int]]:
    """module -> {imported service module: first line}."""
    modules = {module_name(p): p for p in package_dir.rglob("*.py")}
    edges: dict[str, dict[str, int]] = {m: {} for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for target, line in _imports(tree, module, path.name == "__init__.py"):
            if target in modules and target != module:
                edges[module].setdefault(target, line)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def problems(package_dir: Path) -> list[str]:
    edges = graph(package_dir)
    out: list[str] = []
    for module in sorted(edges):
        rank = layer_of(module)
        if rank is None:
            out.append(f"{module}: in no layer; add it to LAYERS in tests/support/layers.py")
            continue
        for target, line in sorted(edges[module].items()):
            target_rank = layer_of(target)
            if target_rank is not None and target_rank < rank:
                out.append(
                    f"{module}:{line} imports {target}: {LAYERS[rank][0]} must not depend on"
                    f" {LAYERS[target_rank][0]} (a layer above)"
                )
    for component in cycles(edges):
        out.append("import cycle: " + " -> ".join(component))
    return out


def main() -> int:
    found = problems(ROOT / PACKAGE)
    for line in found:
        print(line, file=sys.stderr)
    if found:
        return 1
    print(f"{PACKAGE}/: no import cycle, every import points down a layer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
