"""One registry of skip reasons (megavl/data/skips.py): every reason the data layer or a task counts
is a registered name, never a string of its own, and every group the engine logs is registered."""
import ast
import pathlib

import megavl
from megavl.data import skips

ROOT = pathlib.Path(megavl.__file__).parent
SCANNED = sorted((ROOT / "data").glob("*.py")) + sorted((ROOT / "tasks").glob("*.py"))
COUNTED = set(skips.REASONS) | {skips.REPEATED}
GROUPS = ("IMAGE_SAMPLE_SKIP_REASONS", "VIDEO_SKIP_REASONS", "SKIP_REASONS", "IMAGE_FILE_SKIP_REASONS",
          "VIDEO_FILE_SKIP_REASONS", "TASK_SKIP_REASONS", "ANNOTATION_SKIP_REASONS",
          "CLASSIFICATION_SKIP_REASONS")


def docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def skip_names(tree: ast.AST) -> set[str]:
    """Names a module imports from megavl.data.skips."""
    return {a.asname or a.name for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "megavl.data.skips" for a in node.names}


def counting_sites(tree: ast.AST) -> list[ast.expr]:
    """What a skip is counted or raised as: `counter[X] += n` and `SkipSample(X)`."""
    sites = []
    for node in ast.walk(tree):
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Subscript):
            sites.append(node.target.slice)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "SkipSample" and node.args):
            sites.append(node.args[0])
    return sites


def test_no_module_spells_a_reason_itself():
    spelt = []
    for path in SCANNED:
        if path.name == "skips.py":
            continue
        tree = ast.parse(path.read_text())
        skip_doc = docstrings(tree)
        spelt += [f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in COUNTED and id(node) not in skip_doc]
    assert not spelt, "use the names of megavl/data/skips.py:\n" + "\n".join(spelt)


def test_every_counted_reason_is_a_registered_name():
    bad = []
    for path in SCANNED:
        tree = ast.parse(path.read_text())
        names = skip_names(tree)
        for site in counting_sites(tree):
            for node in ast.walk(site):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant)
                                                       and isinstance(node.value, str)):
                    bad.append(f"{where} counts a string of its own")
                elif (isinstance(node, ast.Name) and node.id in names
                      and getattr(skips, node.id) not in COUNTED):
                    bad.append(f"{where} counts {node.id}, which is not a reason")
    assert not bad, "\n".join(bad)


def test_the_counting_scan_sees_literals():
    tree = ast.parse('skips["corrupt_image"] += 1\nraise SkipSample(f"missing_{kind}")\n')
    assert [type(s).__name__ for s in counting_sites(tree)] == ["Constant", "JoinedStr"]


def test_groups_are_ordered_registered_and_without_repeats():
    assert len(set(skips.REASONS)) == len(skips.REASONS) and all(skips.REASONS.values())
    for group in GROUPS:
        reasons = getattr(skips, group)
        assert isinstance(reasons, tuple) and len(set(reasons)) == len(reasons), group
        assert set(reasons) <= set(skips.REASONS), group
    assert skips.REPEATED not in skips.REASONS  # a filled slot, not a skip
    assert set(skips.IMAGE_SAMPLE_SKIP_REASONS) | set(skips.VIDEO_SKIP_REASONS) | {
        skips.UNREADABLE_SHARD, skips.MISSING_INDEX, skips.BAD_INDEX,
        skips.WRONG_MODALITY} == set(skips.SKIP_REASONS)
    assert set(skips.TASK_SKIP_REASONS) == (set(skips.IMAGE_FILE_SKIP_REASONS)
                                            | set(skips.VIDEO_FILE_SKIP_REASONS))
