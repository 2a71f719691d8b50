"""The package boundaries, checked from the source (no imports run): who may import whom, no import circles, no
reaching into another module's private members, and no test-only code imported by the library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("retrieval", "indexer", "clipsearch")
# (importer prefix, imported prefix): forbidden, whether the import is at the top or inside a function. The package
# graph is a tree, clipsearch (CLI, lab) -> indexer (write side) -> retrieval (core, model, store, search): every
# module of retrieval is covered by its package prefix, so a new core module (image_meta, say) is guarded too.
FORBIDDEN = (
    ("retrieval", "indexer"),
    ("retrieval", "clipsearch"),
    ("indexer", "clipsearch"),
    ("indexer", "retrieval.search"),
    ("retrieval.model", "retrieval.store"),
    ("retrieval.model", "retrieval.search"),
    ("retrieval.store", "retrieval.search"),
    ("clipsearch.lab", "clipsearch.cli"),
)
TEST_ONLY = "retrieval.testing"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, ast.Module]:
    return {
        module_name(path): ast.parse(path.read_text(), str(path))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def imports_of(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (``from a import b`` counts ``a.b`` when that is a module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = {module for module in found if module in known or module.rsplit(".", 1)[0] not in known}
    return {module for module in found if module.split(".")[0] in PACKAGES and module != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = library_modules()
    known = set(modules)
    return {name: imports_of(name, tree, known) & known for name, tree in modules.items()}


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_read_side_and_the_core_never_import_the_write_side(graph):
    broken = [
        f"{importer} imports {imported}"
        for importer, imported_set in graph.items()
        for imported in imported_set
        for low, high in FORBIDDEN
        if within(importer, low) and within(imported, high)
    ]
    assert not broken, "\n".join(sorted(broken))


def test_there_are_no_import_circles(graph):
    """Top-level imports only: a function-level import runs after both modules exist, but a circle of those is
    still a design smell, so all imports count."""
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for imported in sorted(graph[module]):
            if seen.get(imported) == 1:
                circles.append(" -> ".join(path[path.index(imported) :] + [imported]))
            elif imported not in seen:
                visit(imported, [*path, imported])
        seen[module] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [module])
    # a package importing its own submodules (cli/__init__ registering commands) is not a circle of design
    circles = [c for c in circles if not all(part.startswith(c.split(" -> ")[0]) for part in c.split(" -> "))]
    assert not circles, "\n".join(circles)


def test_the_library_does_not_import_test_only_code(graph):
    users = sorted(name for name, imported in graph.items() if TEST_ONLY in imported and name != TEST_ONLY)
    assert not users, f"{TEST_ONLY} is for tests and benchmarks only, yet imported by {users}"


def test_no_module_reaches_into_another_modules_private_members():
    """``other._private`` on an imported project module or on an object of another class (``x._y`` where x is
    not self/cls) is reaching in. Dunder names and private names of the module's own objects are fine."""
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            local_names = {node.name for node in ast.walk(tree) if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
            local_names |= {
                target.id
                for node in ast.walk(tree)
                if isinstance(node, ast.Assign)
                for target in node.targets
                if isinstance(target, ast.Name)
            }
            for node in ast.walk(tree):
                if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                    continue
                owner = node.value
                if isinstance(owner, ast.Name) and (owner.id in ("self", "cls") or owner.id in local_names):
                    continue
                if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                    continue
                text = ast.unparse(node)
                if text in ALLOWED_PRIVATE:
                    continue
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text}")
    assert not offenders, "\n".join(offenders)


# Private members of third-party libraries that we use knowingly, each with its reason.
ALLOWED_PRIVATE = {
    "sys._getframe",
}


def test_docs_layout_lists_every_module():
    """docs/layout.md is the map a newcomer reads first: every module of the three packages appears in it by name."""
    text = (ROOT / "docs" / "layout.md").read_text()
    missing = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "__init__.py" and path.name not in text
    ]
    assert not missing, f"docs/layout.md does not mention: {missing}"


# Where ``resolve_device`` may be called: the top. Every CLI command, and the public entries that take a string
# from a library caller (each resolves it once, at its first line, and passes the ``Device`` down).
DEVICE_ENTRIES = {
    ("retrieval/search/engine.py", "__init__"),  # SearchEngine(index_dir, device="auto")
    ("indexer/pipeline.py", "index_paths"),
    ("indexer/pipeline.py", "preload_encoder"),
    ("indexer/reindex.py", "reindex"),
    ("clipsearch/lab/evaluate.py", "evaluate"),
    ("clipsearch/lab/training.py", "train_model"),
    ("clipsearch/launch.py", "open_encoder_first"),  # the command's entry, before the CLI: --device left at auto
}


def calls_in_functions(tree: ast.Module, name: str) -> list[tuple[str, int]]:
    """(enclosing function, line) of every call of ``name`` (a bare name or an attribute) in the module."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                called = child.func.id if isinstance(child.func, ast.Name) else getattr(child.func, "attr", None)
                if called == name:
                    found.append((function, child.lineno))
            visit(child, inner)

    visit(tree, "<module>")
    return found


def test_device_is_resolved_only_at_the_top():
    """``--device`` becomes a ``Device`` once, in the CLI command or the public entry a library caller uses;
    below that the value is passed, never resolved again (issue 22, item 5)."""
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = str(path.relative_to(ROOT))
            for function, line in calls_in_functions(ast.parse(path.read_text()), "resolve_device"):
                if relative.startswith("clipsearch/cli/") or (relative, function) in DEVICE_ENTRIES:
                    continue
                offenders.append(f"{relative}:{line} in {function}()")
    assert not offenders, "resolve_device below the top:\n" + "\n".join(offenders)


def test_one_definition_of_the_end_of_text_truncation():
    """The text tower up to the last end-of-text token is one function (``retrieval/model/text_features.py``):
    no other model module finds the end-of-text position (an argmax over token ids) or cuts the causal mask."""
    offenders = []
    for path in sorted((ROOT / "retrieval").rglob("*.py")):
        if path.name == "text_features.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "argmax":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("attn_mask"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "\n".join(offenders)
