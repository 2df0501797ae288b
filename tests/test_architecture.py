"""The layering rules of docs/architecture.md, checked from the imports (top-level and inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clasp_decoding"


def imports_of(path: Path) -> set[str]:
    """Package modules ``path`` imports, as dotted names relative to the package (``drafting.base``)."""
    module = path.relative_to(PACKAGE).with_suffix("")
    parts = list(module.parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if (node.module or "").startswith("clasp_decoding"):
                    out.add(node.module.removeprefix("clasp_decoding").lstrip("."))
                continue
            base = parts[: len(parts) - node.level]
            if parts[-1] == "__init__":
                base = parts[: len(parts) - node.level]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [a.name for a in node.names]
            if node.module is None:
                out.update(f"{target}.{n}".strip(".") for n in names)
            else:
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(
                a.name.removeprefix("clasp_decoding.") for a in node.names if a.name.startswith("clasp_decoding")
            )
    return {m.removesuffix(".__init__") for m in out}


def modules() -> dict[str, set[str]]:
    table = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        table[name] = imports_of(path)
    return table


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_cache_and_the_runner_import_nothing_above_them():
    table = modules()
    assert table["kv_cache"] == set()
    assert table["runner"] <= {"draft_head", "errors", "families", "kv_cache", "numerics"}, table["runner"]
    for low in ("draft_head", "families", "numerics", "noise", "layer_select", "sampling"):
        assert {top(m) for m in table[low]} <= {"errors", "noise", "kernels", "cpu_linear"}, (low, table[low])
    assert table["kernels"] <= {"paths"}, table["kernels"]  # building and loading kernels, nothing above
    assert table["cpu_linear"] <= {"kernels", "paths"}, table["cpu_linear"]  # choosing among them


def test_the_loop_knows_drafting_only_through_its_interface():
    table = modules()
    drafting = {m for m in table["decoding"] if top(m) == "drafting"}
    assert drafting == {"drafting.base"}, drafting


def test_drafting_strategies_do_not_reach_up():
    table = modules()
    above = {"decoding", "api", "context", "engine", "server", "cli", "bench", "hf", "models", "fetch"}
    for name, deps in table.items():
        if top(name) == "drafting":
            assert not {top(m) for m in deps} & above, (name, deps)


def test_only_the_command_line_imports_the_benchmark_and_the_server():
    table = modules()
    for name, deps in table.items():
        if top(name) in ("bench", "cli"):
            continue
        assert "bench" not in {top(m) for m in deps}, (name, deps)
        if top(name) != "server":
            assert "server" not in {top(m) for m in deps}, (name, deps)


def test_no_function_is_longer_than_about_80_lines():
    longest = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                longest.append((node.end_lineno - node.lineno + 1, f"{path.name}:{node.name}"))
    assert max(longest)[0] <= 85, sorted(longest)[-5:]


def cycles(table: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among the package's modules (any import: top level, in a function, for typing)."""
    found, state, stack = [], {}, []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for dep in sorted(table.get(name, ())):
            if dep not in table or dep == name:
                continue
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[name] = "done"

    for name in sorted(table):
        if name not in state:
            visit(name)
    return found


def test_no_import_cycles():
    """A lower module owns what modules above it share (the method names live in ``config``, running
    estimates in ``costs``): no module imports one that imports it back."""
    found = modules()
    table = {k: {d for d in v if d in found} for k, v in found.items()}
    assert cycles(table) == [], cycles(table)
