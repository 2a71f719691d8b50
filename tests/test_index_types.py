"""Index kinds as objects: each registry entry's facts hold for the FAISS index it makes, and no library module
outside ``retrieval/store/index_types.py`` decides anything by comparing an index type's name (so adding a type
touches the registry, not every module that branches on types)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import UsageError
from retrieval.store.index_types import INDEX_TYPES, KINDS, choices_help, detect, kind
from retrieval.store.vectors import VectorIndex
from retrieval.testing import EmbeddingSpace

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("retrieval", "indexer", "clipsearch")
REGISTRY = ROOT / "retrieval" / "store" / "index_types.py"
TYPE_NAMES = {"flat", "ivf", "ivfpq", "hnsw", *INDEX_TYPES}
DIM = 32


def _literals(node: ast.AST) -> list[str]:
    """String constants a comparison operand names: itself, or the items of a literal tuple, list or set."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [item.value for item in items if isinstance(item, ast.Constant) and isinstance(item.value, str)]


def type_name_comparisons(source: str) -> list[tuple[int, str]]:
    """(line, name) of every ``==``/``!=``/``in``/``not in`` test and ``match`` case against an index type's name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        else:
            continue
        found.extend((node.lineno, name) for operand in operands for name in _literals(operand) if name in TYPE_NAMES)
    return found


def test_no_library_module_compares_index_type_names_outside_the_registry():
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {name!r}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != REGISTRY
        for line, name in type_name_comparisons(path.read_text())
    ]
    assert not offenders, "ask the index kind (retrieval/store/index_types.py) instead:\n" + "\n".join(offenders)


def test_the_guard_sees_every_form_of_comparison():
    source = """
if index_type == "flat": pass
if kind.name in ("ivf", "ivfpq"): pass
if "hnsw" != name: pass
match name:
    case "ivf": pass
if name == "auto" or name in ("a", "b"): pass
"""
    assert [name for _, name in type_name_comparisons(source)] == ["flat", "ivf", "ivfpq", "hnsw", "ivf"]


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return EmbeddingSpace.make(DIM, clusters=8, seed=3).all_images(600, seed=4).astype(np.float32)


@pytest.mark.parametrize("name", INDEX_TYPES)
def test_each_kind_makes_an_index_that_is_read_back_as_itself_and_does_what_it_claims(tmp_path, vectors, name):
    ids = np.arange(len(vectors), dtype=np.int64) * 2 + 5
    index = VectorIndex.build(DIM, [(ids, vectors)], name)
    assert index.kind is kind(name) and detect(index.index) is kind(name)
    index.save(tmp_path / "vectors.faiss")
    loaded = VectorIndex.load(tmp_path / "vectors.faiss")
    assert loaded.kind is kind(name) and loaded.search_effort() == index.search_effort()
    assert sorted(loaded.ids().tolist()) == ids.tolist()
    if loaded.kind.keeps_vectors:
        stored_ids, stored = loaded.stored_vectors()
        np.testing.assert_allclose(stored, vectors[(stored_ids - 5) // 2], atol=1e-3)
    else:
        with pytest.raises(ValueError):
            loaded.stored_vectors()
    if loaded.kind.exact:
        assert loaded.kind.efforts(loaded.index) == []
    else:
        ladder = loaded.kind.efforts(loaded.index)
        assert ladder == sorted(ladder) and len(ladder) > 1
        loaded.set_search_effort(ladder[-1])
        assert loaded.search_effort() == ladder[-1]
    loaded.remove(ids[:3].tolist())
    assert loaded.needs_rebuild is not loaded.kind.removes
    assert loaded.kind.bytes_per_vector(DIM, loaded.params) > 0
    copy = index.kind.device_copy(index.index, "cpu")  # the GPU code on CPU tensors; no faiss-gpu in CI
    if index.kind.exact:
        np.testing.assert_array_equal(copy.search(vectors[:4], 5)[1], index.search(vectors[:4], 5)[1])
    else:
        assert copy is None


def test_the_registry_is_the_one_list_of_types():
    assert tuple(KINDS) == INDEX_TYPES == ("flat", "ivf", "ivfpq", "hnsw")
    assert all(name in choices_help() for name in INDEX_TYPES)
    assert [k.name for k in KINDS.values() if k.exact] == ["flat"]
    with pytest.raises(UsageError, match="unknown index type 'lsh'"):
        kind("lsh")
