"""Draw the import house of ``src/tuneforge``: rooms, floors, imports that run back up, circles.

A *room* is a top-level module or package of ``tuneforge`` (``cli``, ``config``, ``data``, ``training``, ...).
Every ``import`` and ``from ... import`` in every module counts, function-level ones too (a lazy import is
still a dependency), except those under ``if TYPE_CHECKING:`` (annotations, never run). Then:

- *circles*: groups of modules that import each other, directly or around a loop (strongly connected
  components of the module graph with more than one module);
- *imports that run back up*: room-to-room edges that have to be dropped to make the room graph a
  ladder (a greedy minimum feedback-arc set, Eades-Lin-Smyth; edges inside a room do not count);
- *floors*: the length of the longest chain of rooms once those edges are dropped (a room that imports
  nothing in tuneforge stands on floor 1);
- *method-name comparisons outside methods/*: comparisons (``==``, ``!=``, ``in``) against a method's name
  or saved type written as a string, and tuples, lists, sets or dict keys made of such strings (they are
  compared against later), in any module outside ``methods/``. A method owns its behaviour when this is 0.

    python scripts/house.py            # the table
    python scripts/house.py --json     # the same as JSON
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = "tuneforge"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top_level_nodes(tree: ast.Module):
    """The statements run when the module is imported (not inside a function or ``if TYPE_CHECKING``)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def all_but_type_checking(tree: ast.Module):
    """Every node but those under ``if TYPE_CHECKING:`` (annotations only: never imported at run time)."""
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, name: str, is_package: bool, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    here = name.split(".") if is_package else name.split(".")[:-1]
    for node in (top_level_nodes(tree) if top_level_only else all_but_type_checking(tree)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from a.b import c, d": the modules a.b.c and a.b.d where they are modules, and a.b itself
            # unless every name is a module (then a.b is only the folder they live in)
            found.add(target + "#" + ",".join(alias.name for alias in node.names))
    return {f for f in found if f.split("#")[0] == PACKAGE or f.startswith(PACKAGE + ".")}


def module_graph(root: Path, top_level_only: bool = False) -> dict[str, set[str]]:
    files = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        candidates: set[str] = set()
        for imported in imports_of(path, name, path.name == "__init__.py", top_level_only):
            if "#" in imported:
                stem, names = imported.split("#")
                modules = [f"{stem}.{n}" for n in names.split(",")]
                candidates.update(m for m in modules if m in files)
                if not all(m in files for m in modules):
                    candidates.add(stem)
            else:
                candidates.add(imported)
        for imported in candidates:
            # the longest prefix that is a module of ours ("a.b.c" may name a function c in module a.b)
            parts = imported.split(".")
            while parts and ".".join(parts) not in files:
                parts.pop()
            if parts and ".".join(parts) != name:
                targets.add(".".join(parts))
        graph[name] = targets
    return graph


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
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
            components.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def eades_order(nodes: set[str], edges: set[tuple[str, str]]) -> list[str]:
    """An order of the rooms with few edges pointing backwards (importers first, imported last)."""
    remaining = set(nodes)
    left: list[str] = []
    right: list[str] = []

    def out_deg(n):
        return sum(1 for a, b in edges if a == n and b in remaining and a != b)

    def in_deg(n):
        return sum(1 for a, b in edges if b == n and a in remaining and a != b)

    while remaining:
        changed = True
        while changed:
            changed = False
            for n in sorted(remaining):
                if out_deg(n) == 0:  # imports nothing left: goes to the bottom
                    right.insert(0, n)
                    remaining.discard(n)
                    changed = True
            for n in sorted(remaining):
                if in_deg(n) == 0:  # nobody left imports it: goes to the top
                    left.append(n)
                    remaining.discard(n)
                    changed = True
        if remaining:
            best = max(sorted(remaining), key=lambda n: out_deg(n) - in_deg(n))
            left.append(best)
            remaining.discard(best)
    return left + right


def method_literals() -> set[str]:
    from tuneforge.methods.registry import methods

    names: set[str] = set()
    for method in methods():
        names.add(method.name)
        names.update(method.saved_types)
    return names


def method_name_comparisons(root: Path) -> list[str]:
    names = method_literals()

    # "prompt" and "adapter" are method names and also ordinary words (a data field, a served adapter):
    # they count only beside a method's other names, or compared with something named method/kind/type
    ambiguous = {"prompt", "adapter"}

    def is_name(node: ast.AST, strict: bool = False) -> bool:
        return (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
                and not (strict and node.value in ambiguous))

    def holds_names(node: ast.AST) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(is_name(e, strict=True) for e in node.elts)
        if isinstance(node, ast.Dict):
            return any(k is not None and is_name(k, strict=True) for k in node.keys)
        return False

    def about_methods(operands: list[ast.AST]) -> bool:
        text = " ".join(ast.unparse(o) for o in operands if not isinstance(o, ast.Constant))
        return any(word in text for word in ("method", "kind", "type"))

    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] == "methods":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        counted: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                if any(is_name(o, strict=True) or holds_names(o) for o in operands) or (
                        any(is_name(o) for o in operands) and about_methods(operands)):
                    found.append(f"{relative}:{node.lineno}: {ast.unparse(node)[:80]}")
                    counted.update(id(o) for o in operands)
        for node in ast.walk(tree):
            if holds_names(node) and id(node) not in counted:
                found.append(f"{relative}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def house(root: Path) -> dict:
    graph = module_graph(root)
    circles = [c for c in strongly_connected(graph) if len(c) > 1]
    rooms = sorted({room_of(m) for m in graph if room_of(m)})
    room_edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for src, targets in graph.items():
        for dst in targets:
            a, b = room_of(src), room_of(dst)
            if a and b and a != b:
                room_edges[(a, b)].append(f"{src} -> {dst}")
    order = eades_order(set(rooms), set(room_edges))
    position = {room: i for i, room in enumerate(order)}
    back = {e: room_edges[e] for e in room_edges if position[e[0]] > position[e[1]]}
    forward = [e for e in room_edges if e not in back]
    floor: dict[str, int] = {}
    for room in reversed(order):  # imported rooms first
        below = [floor[b] for a, b in forward if a == room]
        floor[room] = 1 + max(below, default=0)
    return {
        "rooms": len(rooms),
        "floors": max(floor.values(), default=0),
        "back_up_imports": len(back),
        "circles": len(circles),
        "floor_of": {room: floor[room] for room in sorted(rooms, key=lambda r: (-floor[r], r))},
        "back_up": {f"{a} -> {b}": sites for (a, b), sites in sorted(back.items())},
        "circle_modules": circles,
        "method_name_comparisons": method_name_comparisons(root),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / "src" / PACKAGE))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = house(Path(args.root))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['rooms']} rooms on {result['floors']} floors, "
          f"{result['back_up_imports']} imports that run back up, {result['circles']} import circles")
    by_floor: dict[int, list[str]] = defaultdict(list)
    for room, level in result["floor_of"].items():
        by_floor[level].append(room)
    for level in sorted(by_floor, reverse=True):
        print(f"  floor {level:>2}: {', '.join(sorted(by_floor[level]))}")
    for edge, sites in result["back_up"].items():
        print(f"  back up: {edge}  ({sites[0]}{' ...' if len(sites) > 1 else ''})")
    for circle in result["circle_modules"]:
        print(f"  circle: {' <-> '.join(circle)}")
    print(f"{len(result['method_name_comparisons'])} method-name comparisons outside methods/")
    for site in result["method_name_comparisons"]:
        print(f"  {site}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
