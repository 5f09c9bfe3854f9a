"""kernels/ holds ops only: every module imports torch, triton, the standard library or another kernels/ module.

Model wiring (which op runs which layer) lives with the models in engine/; a kernels module that imports engine (or
any other third-party package) would tie the ops to one model and make the import graph circular.
"""

import ast
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
ALLOWED = {"torch", "triton", "kernels"} | set(sys.stdlib_module_names)


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in the module, nested ones (in functions, try blocks) included, and
    of ``importlib.import_module("...")`` / ``__import__("...")`` calls on a literal name. Relative imports are
    kernels/ itself."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value.split(".")[0]))
    return found


def test_kernels_import_only_torch_triton_stdlib_and_kernels():
    files = sorted(KERNELS.glob("*.py"))
    assert KERNELS / "interp_unet.py" in files and KERNELS / "__init__.py" in files
    bad = [
        f"kernels/{path.name}:{line} imports {name}"
        for path in files
        for line, name in _imported(ast.parse(path.read_text(), filename=str(path)))
        if name not in ALLOWED
    ]
    assert not bad, "kernels/ may import only torch, triton, the standard library and kernels/:\n" + "\n".join(bad)
