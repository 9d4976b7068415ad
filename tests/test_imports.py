"""No import cycle: no module of the package imports one that imports it back, directly or through others, at the
top or inside a function. (A cycle makes the import order matter and hides what a module depends on.) The one
exception is a module-level ``__getattr__`` that forwards a deprecated name: it is not a dependency."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"vdit_sparse": ROOT / "vdit_sparse", "vdit_sparse.kernels": ROOT / "kernels",
            "vdit_sparse.pipelines": ROOT / "pipelines", "vdit_sparse.configs": ROOT / "configs"}


def modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__), as the package installs them."""
    out = {}
    for package, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = f.relative_to(folder).with_suffix("").parts
            if package == "vdit_sparse" and parts[0] == "data":
                continue
            out[".".join([package, *(p for p in parts if p != "__init__")])] = (f, parts[-1] == "__init__")
    return out


def imports(name: str, path: Path, is_package: bool, known: dict) -> set[str]:
    """The package's modules ``name`` imports anywhere (``from . import x`` counts as importing x)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__" for n in ast.walk(f)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = name if is_package else name.rsplit(".", 1)[0]
            for _ in range(max(node.level - 1, 0)):
                base = base.rsplit(".", 1)[0]
            target = (base + ("." + node.module if node.module else "")) if node.level else node.module
            submodules = {f"{target}.{a.name}" for a in node.names} & set(known)
            found |= submodules or ({target} & set(known))
    return found - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_one_that_imports_it_back():
    known = modules()
    graph = {name: imports(name, path, pkg, known) for name, (path, pkg) in known.items()}
    assert len(graph) > 40
    assert cycles(graph) == []
