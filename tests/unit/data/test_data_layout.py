"""data/ reads in the order a sample flows: every module imports, none imports another that leads
back to it, and the package docstring names every file."""
import ast
import importlib
import pathlib

import megavl.data

DATA_DIR = pathlib.Path(megavl.data.__file__).parent
PACKAGE = "megavl.data"


def data_modules() -> list[str]:
    return sorted(p.stem for p in DATA_DIR.glob("*.py") if p.stem != "__init__")


def imports_of(module: str) -> set[str]:
    """The megavl.data modules `module` imports anywhere in its source (function bodies and
    TYPE_CHECKING blocks included: a circle there is still a circle to a reader)."""
    path = DATA_DIR / ("__init__.py" if module == "__init__" else f"{module}.py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE:
                found.add("__init__")
            elif name.startswith(PACKAGE + ".") and name.count(".") == 2:
                candidate = name.split(".")[2]
                if (DATA_DIR / f"{candidate}.py").exists():
                    found.add(candidate)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_every_data_module_imports():
    for module in data_modules():
        importlib.import_module(f"{PACKAGE}.{module}")


def test_no_import_circle_in_data():
    graph = {m: imports_of(m) - {m} for m in data_modules()}
    assert not any("__init__" in deps for deps in graph.values()), \
        "a data module imports the package itself, which imports every module back"
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_docstring_names_every_file_once():
    doc = megavl.data.__doc__
    for module in data_modules():
        assert doc.count(f" {module}.py ") == 1, f"{module}.py is not listed once in data/__init__.py"
