"""The package's layers: every import inside src/advgen (at the top of a module or inside a function) goes
down the layer order below or stays in its own layer, and no modules import each other in a circle."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "advgen"

# bottom to top; a module may import modules of its own layer or of a lower one, never of a higher one
LAYERS = [
    ("errors", "_version", "flags"),
    ("io", "devices", "precision"),
    ("models", "attacks"),
    ("data",),
    ("config",),
    ("checkpoint",),
    ("evaluation",),
    ("training",),
    ("recipes",),
    ("apps",),
    ("cli",),
    ("__init__", "__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"advgen.{module} is in no layer: add its top-level name to LAYERS")


def imports(path: Path) -> set[str]:
    """The advgen modules `path` imports, anywhere in it, as names relative to the package."""
    me = module_name(path)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "advgen":
                target = node.module.partition(".")[2]
            else:
                continue
            for alias in node.names:   # `from . import methods` imports a module
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if (PACKAGE / sub.replace(".", "/")).exists() or
                          (PACKAGE / (sub.replace(".", "/") + ".py")).exists() else target)
        elif isinstance(node, ast.Import):
            found |= {a.name.partition(".")[2] for a in node.names if a.name.startswith("advgen.")}
    return {m for m in found if m and m != me}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_import_goes_down_the_layers():
    up = [f"advgen.{a} imports advgen.{b}" for a, targets in graph().items() for b in targets
          if a not in ("__init__", "__main__") and layer_of(b) > layer_of(a)]
    assert not up, "imports that reach up a layer:\n" + "\n".join(sorted(up))


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n in g and not state.get(n):
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if not state.get(m):
            circle = visit(m)
            assert circle is None, "import circle: " + " -> ".join(f"advgen.{c}" for c in circle)


def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The checker itself: an import hidden in a function is found (a check that cannot fail proves nothing)."""
    (tmp_path / "io.py").write_text("def f():\n    from .cli import main\n    return main\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    assert imports(tmp_path / "io.py") == {"cli"}
    assert layer_of("cli") > layer_of("io")
