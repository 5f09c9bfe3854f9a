"""The import graph, parsed from the sources (every import, also those inside functions): no cycles between modules
or between engine's packages, ``engine`` never imports ``launcher``. (``kernels`` importing only torch, triton and the
standard library is tests/kernels/test_kernel_imports.py.)"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("engine", "kernels", "launcher")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Our modules that ``path`` imports (``from a.b import c`` counts a.b.c when that is a module, else a.b)."""
    name, out = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t.split(".")[0] in OURS)
    return out - {name}


def graph() -> dict[str, set[str]]:
    files = [p for top in OURS for p in (ROOT / top).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): {m for m in imports_of(p, modules) if m in modules} for p in files}


def package_of(module: str) -> str:
    """engine.<pkg> for modules in engine's subpackages, the module itself for engine's top-level modules."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "engine" else parts[0]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_checker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_cycles():
    assert find_cycle(graph()) is None


def test_no_cycles_between_engine_packages():
    packages: dict[str, set[str]] = {}
    for mod, deps in graph().items():
        if mod.startswith("engine."):
            here = package_of(mod)
            packages.setdefault(here, set()).update(
                package_of(d) for d in deps if d.startswith("engine.") and package_of(d) != here
            )
    assert find_cycle(packages) is None


def test_engine_never_imports_the_launchers():
    bad = {
        m: sorted(d for d in deps if d.startswith("launcher")) for m, deps in graph().items() if m.startswith("engine")
    }
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_graph_is_read():  # the parse finds known edges (a broken parser would pass every test above)
    g = graph()
    assert "engine.train.loop" in g["engine.distill.method"] and "engine.worlds" in g["engine.distill.job"]
    assert "engine.distill.job" in g["launcher.run"]
