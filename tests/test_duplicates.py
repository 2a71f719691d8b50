"""Near-duplicate groups: copies of a photo grouped with it, best file first; a recoloured look-alike stays apart;
chains do not merge distinct photos; an index from before pixel prints gets them without re-encoding.

The full precision / recall measurement (two generated sets, thresholds, linkages) is scripts/bench_duplicates.py.
"""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipsearch.cli import app
from indexer.pipeline import IndexSettings, index_paths
from retrieval.model.spec import ModelSpec
from retrieval.pixel_print import PRINT_BYTES
from retrieval.search.duplicate_defaults import DEFAULT_PIXEL_THRESHOLD
from retrieval.search.duplicate_pairs import similar_pairs
from retrieval.search.duplicates import candidate_pairs, duplicates_in_index, link_pairs
from retrieval.store.catalog import Catalog
from retrieval.store.layout import IndexLayout
from retrieval.testing import EmbeddingSpace, load_script
from retrieval.unit import unit_rows

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ModelSpec(f"local-dir:{ROOT / 'data' / 'models' / 'shapes-clip'}", None)


@pytest.fixture(scope="module")
def duplicate_index(tmp_path_factory):
    """Originals with re-encoded, resized, cropped and EXIF-rotated copies and near-misses with one colour changed
    (the holdout variant: not the set the defaults were chosen on), indexed with the shapes model."""
    root = tmp_path_factory.mktemp("dups")
    make = load_script("make_duplicates_set")
    truth = make.generate_duplicate_set(root / "photos", n_originals=6, seed=3, variant="holdout")
    index_paths(root / "index", [root / "photos"], IndexSettings(model=SHAPES, workers=0), progress=False)
    return root / "index", truth


def pairs(groups) -> set[tuple[str, str]]:
    return {tuple(sorted(p)) for group in groups for p in itertools.combinations(group, 2)}


def test_the_streamed_compact_index_finds_the_pairs_all_pairs_finds():
    """Past EXACT_PAIRS_LIMIT candidate pairs come from an IVF index of 8-bit codes, streamed, and are scored
    exactly: on clustered CLIP-like vectors with planted copies (pairs, and one photo with 40 copies, spread
    over the stream) it finds exactly the pairs scoring every pair finds, with their exact scores, at two
    thresholds."""
    rng = np.random.default_rng(4)
    vectors = EmbeddingSpace.make(64, clusters=50, seed=4).all_images(4000, seed=5)
    originals = rng.choice(len(vectors), size=120, replace=False)
    copies = [unit_rows(vectors[i] + 0.03 * rng.standard_normal(64)) for i in originals[:100]]
    crowd = [unit_rows(vectors[originals[100]] + 0.01 * rng.standard_normal(64)) for _ in range(40)]
    vectors = np.vstack([vectors, *copies, *crowd]).astype(np.float32)
    vectors = vectors[rng.permutation(len(vectors))]  # copies before and after their originals in the stream
    for threshold in (0.97, 0.95):
        exact = similar_pairs(vectors, threshold)
        bucketed = similar_pairs(vectors, threshold, exact_limit=0)
        assert len(exact[0]) > 40 * 41 // 2  # the crowd alone
        assert set(zip(*bucketed[:2])) == set(zip(*exact[:2]))
        assert np.allclose(np.sort(bucketed[2]), np.sort(exact[2]), atol=1e-5)


def test_the_catalog_pass_past_the_exact_limit_gives_the_same_pairs(duplicate_index):
    """The streamed pass over a real catalog (its ids, its stored float16 embeddings) proposes and verifies the
    same pairs, with the same evidence, as scoring every pair."""
    index_dir, _ = duplicate_index
    catalog = Catalog(IndexLayout(index_dir).catalog)
    try:
        exact = candidate_pairs(catalog, 0.85)
        streamed = candidate_pairs(catalog, 0.85, exact_limit=0)
    finally:
        catalog.close()
    assert len(exact.first) > 0
    assert (streamed.first.tolist(), streamed.second.tolist()) == (exact.first.tolist(), exact.second.tolist())
    assert np.allclose(streamed.cosine, exact.cosine, atol=1e-6) and np.array_equal(streamed.pixels, exact.pixels)


def test_link_pairs_complete_does_not_chain():
    # 0~1 and 1~2, but 0 and 2 are not alike: single linkage chains all three, complete keeps 2 out
    first, second = np.array([0, 1]), np.array([1, 2])
    keys = {0: (0,), 1: (1,), 2: (2,)}
    assert link_pairs(first, second, keys, "single") == [[0, 1, 2]]
    assert link_pairs(first, second, keys, "complete") == [[0, 1]]


def test_a_look_alike_of_the_best_file_does_not_take_its_copies():
    # 0 is the best file, a look-alike of the picture 1-4 are copies of: it verifies with 1 and 2 only. The copies
    # stay together and the look-alike is neither kept in their place nor grouped with part of them.
    pairs = [(0, 1), (0, 2), *itertools.combinations(range(1, 5), 2)]
    first, second = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    keys = {node: (node,) for node in range(5)}
    assert link_pairs(first, second, keys, "complete") == [[1, 2, 3, 4]]


def truth_pairs(truth: dict[str, str]) -> set[tuple[str, str]]:
    by_label: dict[str, list[str]] = {}
    for name, label in truth.items():
        by_label.setdefault(label, []).append(name)
    return pairs(by_label.values())


def found_pairs(groups) -> set[tuple[str, str]]:
    return pairs([[Path(m.path).name for m in group.members] for group in groups])


@pytest.mark.slow
def test_copies_are_grouped_and_the_original_kept(duplicate_index):
    index_dir, truth = duplicate_index
    groups = duplicates_in_index(index_dir)
    found, true = found_pairs(groups), truth_pairs(truth)
    recall = len(found & true) / len(true)
    precision = len(found & true) / len(found)
    print(f"precision {precision:.3f} recall {recall:.3f}")
    # scripts/bench_duplicates.py on 100 originals of this variant: precision 1.000, recall 0.996
    assert recall >= 0.95, recall
    assert precision >= 0.95, precision
    for group in groups:
        best = group.members[0]
        assert re.fullmatch(r"scene_\d{4}(_exif)?", Path(best.path).stem), best.path  # the original or its twin
        assert all((best.width * best.height, best.size) >= (m.width * m.height, m.size) for m in group.members)
        assert (best.score, best.pixels) == (1.0, 1.0)
        assert all(member.pixels >= DEFAULT_PIXEL_THRESHOLD for member in group.members)


@pytest.mark.slow
def test_an_index_without_pixel_prints_gets_them_from_the_files(duplicate_index, tmp_path):
    # Every indexed row carries its print; a catalog from before schema 5 (prints NULL) finds the same groups and
    # stores the prints it computed, leaving the embeddings as they were.
    index_dir, _ = duplicate_index
    copy = tmp_path / "index"
    copy.mkdir()
    source = sqlite3.connect(IndexLayout(index_dir).catalog)
    target = sqlite3.connect(IndexLayout(copy).catalog)
    source.backup(target)
    source.close()
    prints = target.execute("SELECT length(pixel_print) FROM images WHERE status = 'ok'").fetchall()
    assert prints and all(length == PRINT_BYTES for (length,) in prints)
    embeddings = target.execute("SELECT id, embedding FROM images ORDER BY id").fetchall()
    target.execute("UPDATE images SET pixel_print = NULL")
    target.commit()
    expected = found_pairs(duplicates_in_index(index_dir))
    assert found_pairs(duplicates_in_index(copy)) == expected
    assert target.execute("SELECT count(*) FROM images WHERE pixel_print IS NOT NULL").fetchone()[0] > 0
    assert target.execute("SELECT id, embedding FROM images ORDER BY id").fetchall() == embeddings
    target.close()


@pytest.mark.slow
def test_duplicates_cli_json(duplicate_index):
    index_dir, _ = duplicate_index
    result = CliRunner().invoke(app, ["duplicates", "--index", str(index_dir), "--threshold", "0.97", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["threshold"] == 0.97 and payload["pixels"] == DEFAULT_PIXEL_THRESHOLD and payload["groups"]
    member_keys = {"image_id", "path", "width", "height", "size", "score", "pixels"}
    assert set(payload["groups"][0]["members"][0]) == member_keys
    bad = CliRunner().invoke(app, ["duplicates", "--index", str(index_dir), "--threshold", "1.5"])
    assert bad.exit_code != 0 and "--threshold" in bad.output


@pytest.mark.slow
def test_duplicates_api_and_page(duplicate_index):
    from fastapi.testclient import TestClient

    from retrieval.search.server import ServerSettings, create_app

    index_dir, _ = duplicate_index
    with TestClient(create_app(index_dir, ServerSettings(device="cpu")), base_url="http://127.0.0.1") as client:
        answer = client.get("/api/duplicates", params={"threshold": 0.97, "limit": 2})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["threshold"] == 0.97 and len(body["groups"]) == min(2, body["total_groups"])
        first = body["groups"][0]["members"][0]
        assert first["score"] == first["pixels"] == 1.0 and client.get(first["thumbnail_url"]).status_code == 200
        assert client.get("/api/duplicates", params={"threshold": 1.5}).status_code == 422
        page = client.get("/duplicates")
        assert page.status_code == 200 and "duplicates.js" in page.text
        assert client.get("/static/duplicates.js").status_code == 200


def test_the_server_searches_pairs_once_at_the_lowest_threshold_and_filters_for_higher_ones(duplicate_index):
    """Each new threshold used to be a full pass over every vector (5 thresholds at 10,000 images: 13.5 s)."""
    from retrieval.search.duplicates import PairsAtLowest

    index_dir, _ = duplicate_index
    catalog = Catalog(IndexLayout(index_dir).catalog)
    try:
        pairs = PairsAtLowest()
        for threshold in (0.85, 0.9, 0.95, 0.97, 0.99):
            filtered = pairs.groups(catalog, threshold)
            fresh = duplicates_in_index(index_dir, threshold)
            assert [[m.path for m in g.members] for g in filtered] == [[m.path for m in g.members] for g in fresh]
        assert pairs.passes == 1
        pairs.groups(catalog, 0.8)  # lower than any before: a new pass
        assert pairs.passes == 2
    finally:
        catalog.close()


@pytest.mark.slow
def test_single_linkage_members_carry_their_evidence(duplicate_index):
    """A chained member need not be a candidate pair of its group's first file: its cosine and pixel similarity
    to that file are computed from the rows and prints the pass already holds; a member led by the same file in
    both linkages carries the same evidence."""
    index_dir, _ = duplicate_index
    complete = {m.path: (g.best.path, m.score, m.pixels) for g in duplicates_in_index(index_dir) for m in g.members}
    single = duplicates_in_index(index_dir, linkage="single")
    assert single
    for group in single:
        assert (group.best.score, group.best.pixels) == (1.0, 1.0)
        for member in group.members:
            assert 0.0 < member.score <= 1.0 and 0.0 <= member.pixels <= 1.0
            leader, score, pixels = complete.get(member.path, (None, None, None))
            if leader == group.best.path:
                assert (member.score, member.pixels) == (score, pixels)
